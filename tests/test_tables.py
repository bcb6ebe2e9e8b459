"""Few-bit tables: the DP is exactly optimal, and the fitted tables are right and sane."""
import itertools
import math

import numpy as np
import pytest
import torch

from fewbit_fx import activations
from fewbit_fx.nn import FewBit
from fewbit_fx.tables import (
    SampleDensity, _dp_partition, all_tables, derivative_mse, optimal_table, sample_rel_rmse,
)

# rel_rmse = sqrt(mse / E_p[f'^2]) under N(0, 1); figures from the few-bit backward paper.
GELU_REFERENCE = {1: 0.29, 2: 0.13, 3: 0.065, 4: 0.036}


def _uniform3(x):
    """Uniform density on [-3, 3]: works on numpy arrays."""
    return ((x >= -3) & (x <= 3)) / 6.0


def _normal2(x):
    """N(0, 2^2) density, torch-only (exercises the numpy -> torch fallback)."""
    return torch.exp(-x * x / 8) / math.sqrt(8 * math.pi)


# --- the DP against brute force -----------------------------------------------------------
def _partition_cost(w, v, edges):
    total = 0.0
    for a, b in zip(edges[:-1], edges[1:]):
        s0, s1, s2 = w[a:b].sum(), (w * v)[a:b].sum(), (w * v * v)[a:b].sum()
        total += s2 - s1 * s1 / s0 if s0 > 0 else s2
    return total


def _prefix(w, v):
    cells = torch.tensor(np.stack([w, w * v, w * v * v]))
    return torch.nn.functional.pad(cells.cumsum(1), (1, 0))


@pytest.mark.parametrize("seed", range(12))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(8, 13))
    w = rng.random(n) * (rng.random(n) > 0.15)  # some cells without mass
    v = rng.normal(size=n)                         # non-monotone 'derivative'
    K = 4 if n <= 10 else 3
    costs, cuts = _dp_partition(*_prefix(w, v), K)
    for k in range(1, K + 1):
        best = min(_partition_cost(w, v, (0, *c, n))
                   for c in itertools.combinations(range(1, n), k - 1))
        assert costs[k - 1].item() == pytest.approx(best, rel=1e-12, abs=1e-14)
        found = cuts[k].tolist()
        assert len(found) == k - 1 and found == sorted(set(found)) and 0 < min(found + [1])
        assert _partition_cost(w, v, (0, *found, n)) == pytest.approx(best, rel=1e-12, abs=1e-14)


def test_dp_finds_plateaus_and_keeps_splitting_at_zero_cost():
    v = np.array([0.0] * 4 + [1.0] * 3 + [0.0] * 5)
    w = np.linspace(0.5, 1.5, v.size)
    costs, cuts = _dp_partition(*_prefix(w, v), 6)
    assert costs[2].item() < 1e-15 and cuts[3].tolist() == [4, 7]
    assert set(cuts[6].tolist()) >= {4, 7} and len(set(cuts[6].tolist())) == 5
    assert costs[5].item() < 1e-15


# --- fitted tables ---------------------------------------------------------------------------
def test_gelu_rel_rmse_matches_reference_and_falls_with_bits():
    tables = all_tables(activations.get("gelu"))
    rel = [tables[b].rel_rmse for b in range(1, 9)]
    assert all(a > b for a, b in zip(rel, rel[1:]))
    for bits, ref in GELU_REFERENCE.items():
        assert rel[bits - 1] == pytest.approx(ref, rel=0.05)


@pytest.mark.parametrize("name, bits", [
    ("relu", 1), ("leaky_relu", 1), ("relu6", 2), ("hardtanh", 2), ("hardsigmoid", 2)])
def test_piecewise_linear_is_exact(name, bits):
    act = activations.get(name)
    t = all_tables(act)[bits]  # shares the cache with the per-activation test below
    assert t.mse < 1e-12
    assert set(act.kinks) <= set(t.borders.tolist())


def test_code_on_a_border_goes_left_like_torch_at_relu_kink():
    act = activations.get("relu")
    t = optimal_table(act, 1)
    x = torch.tensor([-1.0, 0.0, 1e-300, 2.0], dtype=torch.float64)
    assert t.codes(x).tolist() == [0, 0, 1, 1]
    assert torch.equal(t.q(x), act.derivative(x))


@pytest.mark.parametrize("name", activations.SUPPORTED)
def test_every_table_is_well_formed_and_reports_its_mse(name):
    act = activations.get(name)
    for bits, t in all_tables(act).items():
        assert t.bits == bits and t.borders.dtype == t.levels.dtype == torch.float64
        assert t.borders.numel() == 2**bits - 1 and t.levels.numel() == 2**bits
        assert bool((t.borders[1:] > t.borders[:-1]).all())
        assert torch.equal(t.borders.float().double(), t.borders)  # float32 kernels agree
        assert bool(torch.isfinite(t.levels).all())
        dense = derivative_mse(act, t)
        assert abs(t.mse - dense) <= 1e-13 + 1e-7 * dense, (bits, t.mse, dense)


def test_single_and_all_tables_agree_and_are_cached():
    act = activations.get("gelu")
    t3 = optimal_table(act, 3)
    assert optimal_table(act, 3) is t3
    assert torch.equal(t3.borders, all_tables(act)[3].borders)
    assert torch.equal(t3.levels, all_tables(act)[3].levels)


@pytest.mark.parametrize("bits", [0, 9, 2.5, 3.0, True, "3", -1])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match="1..8"):
        optimal_table(activations.get("gelu"), bits)
    with pytest.raises(ValueError, match="1..8"):
        all_tables(activations.get("gelu"), bits)


@pytest.mark.parametrize("density", [_uniform3, _normal2])
def test_density_changes_the_table(density):
    act = activations.get("gelu")
    base, other = optimal_table(act, 2), optimal_table(act, 2, density)
    assert not torch.allclose(base.borders, other.borders, atol=1e-3)
    assert other.mse == pytest.approx(derivative_mse(act, other, density), rel=1e-7, abs=1e-13)


def test_zero_mass_intervals_get_finite_levels():
    act = activations.get("gelu")
    t = optimal_table(act, 8, _uniform3)
    assert bool(torch.isfinite(t.levels).all())
    assert t.mse == pytest.approx(derivative_mse(act, t, _uniform3), rel=1e-7, abs=1e-13)


def test_bad_density_is_rejected():
    with pytest.raises(ValueError, match="normalised"):
        optimal_table(activations.get("gelu"), 1, lambda x: 2 * _uniform3(x))


# --- densities from observed samples ----------------------------------------------------------
def _shifted_normal(x, mean=-1.8, std=2.1):
    return torch.exp(-0.5 * ((torch.as_tensor(x) - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("n", [500, 20_000])
def test_sample_density_fits_as_well_as_the_true_density(n):
    """A table fitted to n samples of N(-1.8, 2.1^2) (GELU inputs of a trained GPT) is within
    3% of the optimum under the true density, and ~3x better than the N(0, 1) table."""
    gelu = activations.get("gelu")
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(n, generator=g, dtype=torch.float64) * 2.1 - 1.8
    fitted = optimal_table(gelu, 3, SampleDensity(samples))
    best = optimal_table(gelu, 3, _shifted_normal)
    normal = optimal_table(gelu, 3)
    mse = lambda t: derivative_mse(gelu, t, _shifted_normal)  # noqa: E731
    assert mse(fitted) <= 1.03 * mse(best)
    assert mse(normal) > 2.5 * mse(fitted)


def test_sample_density_is_normalised_and_keyed_by_content():
    s = torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 3 + 1
    d = SampleDensity(s)
    x = np.linspace(-64, 64, 400_001)
    assert abs(np.trapezoid(d(x), x) - 1) < 1e-6
    assert d(np.array([-50.0, 50.0])).max() == 0
    assert d.samples == 4000
    again = SampleDensity(s.clone())
    assert again == d and hash(again) == hash(d)
    gelu = activations.get("gelu")
    assert optimal_table(gelu, 2, again) is optimal_table(gelu, 2, d)
    assert SampleDensity(s + 0.5) != d


def test_sample_density_drops_non_finite_and_clamps_far_samples():
    s = torch.tensor([float("nan"), float("inf"), -1e6, 1e6] + [0.5] * 1000)
    d = SampleDensity(s)
    assert d.samples == 1002  # nan and inf dropped; +-1e6 clamped to +-60
    table = optimal_table(activations.get("gelu"), 3, d)
    assert torch.isfinite(table.levels).all()
    with pytest.raises(ValueError, match="finite sample"):
        SampleDensity(torch.tensor([float("nan")]))
    d0 = SampleDensity(torch.zeros(300))  # no spread at all: the bandwidth floor keeps it usable
    assert torch.isfinite(optimal_table(activations.get("silu"), 3, d0).levels).all()


def test_sample_rel_rmse_agrees_with_quadrature():
    gelu = activations.get("gelu")
    table = optimal_table(gelu, 3)
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert sample_rel_rmse(gelu, table, x) == pytest.approx(table.rel_rmse, rel=0.02)


# --- fitting leaves the user's process alone ---------------------------------------------------
def test_fitting_never_sets_torch_thread_count(monkeypatch):
    """Refits run during the user's training, and torch's thread count is process-wide: a fit
    must neither change it nor call torch.set_num_threads at all (issue 14)."""
    calls = []

    def no_set_num_threads(n):
        calls.append(n)
        raise AssertionError(f"torch.set_num_threads({n}) called while fitting a table")

    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", no_set_num_threads)
    # Samples no other test uses, so every fit below runs the DP (no cache hit).
    x = torch.randn(6000, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    density = SampleDensity(x * 1.3 - 0.4)
    gelu = activations.get("gelu")
    optimal_table(gelu, 3, density)
    derivative_mse(gelu, all_tables(activations.get("silu"), 4, density)[4], density)
    FewBit(torch.nn.GELU(), bits=2).fit(x.float() * 0.7 + 0.2)
    assert calls == []
    assert torch.get_num_threads() == before
