"""The drop-in modules FewBit(act, bits) and Inverted(act) against the modules they wrap.

Forward: bit-identical to the wrapped module, never writing into the input. Backward:
Inverted against float64 autograd of the wrapped module (torch's own fp32 gradient where the
closed form is torch's kernel); FewBit against grad * levels[bucketize(x, borders)] built
independently from fewbit_fx.tables.optimal_table. Also shapes, errors, torch.compile.

Fitting a few-bit table costs ~1-3 s per (activation, bits) on a small CPU, so tests that do
not depend on the table's values (forward equality, shapes of the saved codes) use a cheap
stand-in table (`stub_tables`); gradient tests use the real optimal tables.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from fewbit_fx.activations import from_module
from fewbit_fx.inverse import SUPPORTED as _INVERSE_SUPPORTED, derivative_from_output
from fewbit_fx.nn import FewBit, Inverted
from fewbit_fx.tables import SampleDensity, optimal_table

try:
    import transformers.activations as hf
except Exception:  # pragma: no cover - optional dependency
    hf = None

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HALF = (torch.bfloat16, torch.float16)

# name -> module factory. Names are test ids.
TORCH_MODULES = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "mish": lambda: nn.Mish(),
    "sigmoid": lambda: nn.Sigmoid(),
    "tanh": lambda: nn.Tanh(),
    # threshold 5: y alone is ambiguous for x in (2.4966, 2.5), so Inverted keeps a mask bit
    "softplus": lambda: nn.Softplus(beta=2, threshold=5),
    "elu": lambda: nn.ELU(alpha=0.7),
    "selu": lambda: nn.SELU(),
    "celu": lambda: nn.CELU(alpha=1.3),
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "relu": lambda: nn.ReLU(),
    "relu6": lambda: nn.ReLU6(),
    "hardswish": lambda: nn.Hardswish(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
    "hardtanh": lambda: nn.Hardtanh(-2, 3),
    "logsigmoid": lambda: nn.LogSigmoid(),
    "softsign": lambda: nn.Softsign(),
    "tanhshrink": lambda: nn.Tanhshrink(),
}
HF_MODULES = {}
if hf is not None:
    HF_MODULES = {
        "hf_new_gelu": lambda: hf.NewGELUActivation(),
        "hf_fast_gelu": lambda: hf.FastGELUActivation(),
        "hf_quick_gelu": lambda: hf.QuickGELUActivation(),
        "hf_gelu_python": lambda: hf.GELUActivation(use_gelu_python=True),
    }
ALL_MODULES = {**TORCH_MODULES, **HF_MODULES}

INPLACE_MODULES = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "mish": lambda: nn.Mish(inplace=True),
    "elu": lambda: nn.ELU(alpha=0.7, inplace=True),
    "selu": lambda: nn.SELU(inplace=True),
    "celu": lambda: nn.CELU(alpha=1.3, inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.2, inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "hardtanh": lambda: nn.Hardtanh(-2, 3, inplace=True),
    "hardswish": lambda: nn.Hardswish(inplace=True),
    "hardsigmoid": lambda: nn.Hardsigmoid(inplace=True),
}

# Inverted backward, by how f'(x) is recovered from y:
# torch's own result-based backward kernel (or the same single multiply): identical to
# torch's fp32 autograd gradient.
TORCH_KERNEL = {"sigmoid", "tanh", "relu", "relu6", "hardtanh", "leaky_relu"}
# closed forms in y that differ from torch's input-based formula only by rounding.
CLOSED_FORM = {"elu", "selu", "celu", "softplus", "hardsigmoid", "logsigmoid", "softsign"}
# numerical inverse (fewbit_fx.inverse) or sqrt-conditioned closed form (hardswish).
NUMERICAL = {"gelu", "gelu_tanh", "silu", "mish", "tanhshrink", "hardswish", *HF_MODULES}
NON_MONOTONE = {"gelu", "gelu_tanh", "silu", "mish", "hardswish", *HF_MODULES}
assert TORCH_KERNEL | CLOSED_FORM | NUMERICAL == set(ALL_MODULES)
INVERSE_TABLES = NON_MONOTONE & set(_INVERSE_SUPPORTED)  # torch's modules with a numerical inverse


def _stub_table(act, bits, density=None):
    """Cheap stand-in for optimal_table when only the table's shape matters."""
    n = 2**bits
    edges = torch.linspace(-3.0, 3.0, n + 1, dtype=torch.float64)
    return SimpleNamespace(borders=edges[1:-1], levels=act.derivative(0.5 * (edges[1:] + edges[:-1])))


@pytest.fixture
def stub_tables(monkeypatch):
    monkeypatch.setattr("fewbit_fx.tables.optimal_table", _stub_table)


def make_x(module: nn.Module, dtype: torch.dtype, n: int = 4000, seed: int = 0,
           avoid: tuple[float, ...] = ()) -> torch.Tensor:
    """N(0, 3^2) and U(-10, 10) samples, in dtype, none within 1e-3 of a kink of f'."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n // 2, generator=g, dtype=torch.float64) * 3,
                   torch.rand(n - n // 2, generator=g, dtype=torch.float64) * 20 - 10]).to(dtype)
    keep = torch.ones_like(x, dtype=torch.bool)
    for k in (*from_module(module).kinks, *avoid):
        keep &= (x.double() - k).abs() > 1e-3
    return x[keep]


def reference_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/dx <module(x), g> by autograd of the original module in float64."""
    x64 = x.detach().double().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(x64), x64, g.double())
    return grad


def torch_grad(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """torch's own gradient of the original module in x's dtype."""
    xr = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(module(xr), xr, g)
    return grad


def run_grad(wrapper: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.detach().clone().requires_grad_(True)
    y = wrapper(xr)
    (grad,) = torch.autograd.grad(y, xr, g)
    return y, grad


def fewbit_expected_grad(module: nn.Module, bits: int, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad * levels[code], codes by torch.bucketize on the table's float64 borders, levels as
    the module stores them (float32), the product in at least float32."""
    table = optimal_table(from_module(module), bits)
    codes = torch.bucketize(x.detach().double().contiguous(), table.borders.double())
    dt = torch.promote_types(g.dtype, torch.float32)
    return (g.to(dt) * table.levels.to(torch.float32).to(dt)[codes]).to(g.dtype)


def _drop_border_ties(x: torch.Tensor, module: nn.Module, bits: int) -> torch.Tensor:
    """The module compares x with float32-rounded borders, the reference with float64 ones;
    they can only disagree for an x exactly on a rounded border. Drop such (rare) x."""
    b32 = optimal_table(from_module(module), bits).borders.float().double()
    return x[~torch.isin(x.double(), b32)]


# --- 1. forward is the wrapped module, bit for bit -----------------------------------------
@pytest.mark.parametrize("variant", ["fewbit", "inverted"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ALL_MODULES))
def test_forward_is_bitwise_the_module(name, dtype, requires_grad, variant, stub_tables):
    module = ALL_MODULES[name]()
    wrapper = FewBit(module, bits=3) if variant == "fewbit" else Inverted(module)
    x = make_x(module, dtype, n=1000).requires_grad_(requires_grad)
    before = x.detach().clone()
    y = wrapper(x)
    assert torch.equal(x.detach(), before)  # input never written
    assert y.dtype == dtype and y.shape == x.shape
    assert y.requires_grad == requires_grad
    assert torch.equal(y.detach(), module(before))


@pytest.mark.parametrize("variant", ["fewbit", "inverted"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("name", list(INPLACE_MODULES))
def test_inplace_false_never_writes_the_input(name, requires_grad, variant, stub_tables):
    module = INPLACE_MODULES[name]()
    wrapper = FewBit(module, bits=2, inplace=False) if variant == "fewbit" else Inverted(module, inplace=False)
    x = make_x(module, torch.float32, n=1000)
    expected = module(x.clone())  # the in-place module on a throwaway copy
    x.requires_grad_(requires_grad)
    before = x.detach().clone()
    y = wrapper(x)
    assert torch.equal(x.detach(), before)
    assert y.data_ptr() != x.data_ptr()
    assert torch.equal(y.detach(), expected)


@pytest.mark.parametrize("variant", ["fewbit", "inverted"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("name", list(INPLACE_MODULES))
def test_inplace_modules_write_in_place_as_the_module_does(name, requires_grad, variant, stub_tables):
    """inplace defaults to the wrapped module's: y in x's storage, x returned, the values
    torch's in-place op computes; gradients as the out-of-place wrapper's."""
    module = INPLACE_MODULES[name]()
    make = (lambda **kw: FewBit(module, bits=2, **kw)) if variant == "fewbit" else (lambda **kw: Inverted(module, **kw))
    wrapper, reference = make(), make(inplace=False)
    assert wrapper.inplace and not reference.inplace
    x = make_x(module, torch.float32, n=1000)
    expected = module(x.clone())
    leaf = x.clone().requires_grad_(requires_grad)
    h = leaf * 1.0  # in place on a non-leaf, as in a network
    out = wrapper(h)
    assert out is h and torch.equal(h.detach(), expected)
    if requires_grad:
        g = torch.randn_like(x)
        (got,) = torch.autograd.grad(out, leaf, g)
        ref_leaf = x.clone().requires_grad_(True)
        (want,) = torch.autograd.grad(reference(ref_leaf * 1.0), ref_leaf, g)
        assert torch.equal(got, want)


@pytest.mark.parametrize("variant", ["fewbit", "inverted"])
def test_inplace_wrapper_keeps_only_what_the_out_of_place_one_keeps(variant, stub_tables):
    """torch's in-place SiLU keeps a copy of x; the in-place wrapper keeps y's storage
    (x's own, which the next layer keeps anyway) or the codes."""
    from fewbit_fx.measure import saved_bytes

    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(64, 256), nn.Linear(256, 8)
    x = torch.randn(512, 64)

    def step(act):
        rec = saved_bytes(lambda: lin2(act(lin1(x))).sum(),
                          exclude=list(lin1.parameters()) + list(lin2.parameters()))
        rec.loss.backward()
        return rec.bytes

    make = (lambda **kw: FewBit(nn.SiLU(inplace=True), bits=2, **kw)) if variant == "fewbit" \
        else (lambda **kw: Inverted(nn.SiLU(inplace=True), **kw))
    plain, out_of_place, in_place = step(nn.SiLU(inplace=True)), step(make(inplace=False)), step(make())
    assert in_place == out_of_place < plain - 512 * 256 * 4 + 512 * 256 // 2
    assert make(inplace=None).inplace and not make(inplace=False).inplace
    with pytest.raises(TypeError, match="inplace must be"):
        make(inplace="yes")


def test_no_grad_mode_is_plain_forward(stub_tables):
    x = make_x(nn.GELU(), torch.float32, n=100).requires_grad_(True)
    for wrapper in (FewBit(nn.GELU()), Inverted(nn.GELU())):
        with torch.no_grad():
            y = wrapper(x)
        assert not y.requires_grad
        assert torch.equal(y, nn.GELU()(x.detach()))


def test_state_dict_is_unchanged(stub_tables):
    # Swapping an activation must not change the model's state_dict (tables are not state).
    assert FewBit(nn.GELU(), bits=3).state_dict() == {}
    assert Inverted(nn.GELU()).state_dict() == {}
    assert "bits=3" in repr(FewBit(nn.GELU(), bits=3))


# --- 2. backward ----------------------------------------------------------------------------
# Max |grad error| for upstream gradient 1, against float64 autograd of the module.
# fp32: the numerical inverse reads x back to ~1e-8 but y itself carries fp32 rounding; near
# the minimum of a non-monotone f, f' ~ sqrt(2 f'' |dy|), which puts the floor at ~5e-5 (gelu)
# to ~1.1e-4 (hardswish, gelu_tanh); 2e-4 is that floor with margin.
# Half types: the same floor with half's rounding of y: sqrt(2 f''(x_min) * half-ulp(y_min))
# ~ 7e-3 (fp16) / 1.6e-2 (bf16) for gelu, ~9e-3 / 2.6e-2 for hardswish; the Hugging Face
# formulas evaluate y with several roundings in half precision (torch's own gradient of them
# is off by 2e-3 / 1.3e-2), which measures up to 1.2e-2 / 2.9e-2.
# Monotone functions have no such amplification: the error is a few roundings of y and of
# the result (bf16 half-ulp at 1..2 is 3.9e-3).
TOL = {
    # (non-monotone or sqrt-conditioned, dtype)
    (True, torch.float32): 2e-4,
    (True, torch.float16): 1.5e-2,
    (True, torch.bfloat16): 3.5e-2,
    (True, torch.float64): 1e-7,
    (False, torch.float32): 1e-6,
    (False, torch.float16): 2e-3,
    (False, torch.bfloat16): 1e-2,
    # fp64 references are themselves off by ~4e-8 for CELU (torch computes 1/alpha in fp32
    # in celu's backward) and ~5e-9 for hardsigmoid (fp32 1/6).
    (False, torch.float64): 1e-7,
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ALL_MODULES))
def test_inverted_gradient_vs_float64_reference(name, dtype):
    module = ALL_MODULES[name]()
    x = make_x(module, dtype, n=20000)
    g = torch.ones_like(x)
    y, grad = run_grad(Inverted(module), x, g)
    assert torch.equal(y.detach(), module(x))
    assert grad.dtype == dtype
    reference = reference_grad(module, x, g)
    err = (grad.double() - reference).abs()
    tol = TOL[name in NUMERICAL, dtype]
    if dtype == torch.float32 and name in INVERSE_TABLES:
        # Eager y is torch's own (the forward is unchanged), and near the minimum f' ~
        # sqrt(y - y_min) turns its ulps into f' error: on AVX2 torch's GELU y is a few ulps
        # off there (2.1e-4 at x = -0.75; AVX-512's within 2e-4). The float64 inverse of
        # that very y is what any method given it must lose; ours must stay at it.
        right = x.double() > from_module(module).x_min
        floor = (derivative_from_output(from_module(module), y.detach().double(), right, torch.float64)
                 - reference).abs().max().item()
        tol = max(tol, 1.05 * floor)
    worst = int(err.argmax())
    assert float(err.max()) <= tol, (
        f"{name} {dtype}: max |error| {float(err.max()):.3g} > {tol:g} at x = {float(x[worst])!r}"
    )


@pytest.mark.parametrize("name", sorted(TORCH_KERNEL | CLOSED_FORM))
def test_inverted_closed_forms_match_torch_fp32_autograd(name):
    module = ALL_MODULES[name]()
    x = make_x(module, torch.float32, n=20000, seed=1)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    _, grad = run_grad(Inverted(module), x, g)
    expected = torch_grad(module, x, g)
    if name in TORCH_KERNEL:
        assert torch.equal(grad, expected)
    else:
        assert torch.allclose(grad, expected, rtol=1e-6, atol=1e-6), float((grad - expected).abs().max())


@pytest.mark.parametrize("name", sorted(NUMERICAL - TORCH_KERNEL - CLOSED_FORM))
def test_inverted_numerical_gradient_scales_with_upstream_grad(name):
    # A random upstream gradient: the result is grad * f'(x), not f'(x) alone.
    module = ALL_MODULES[name]()
    x = make_x(module, torch.float32, n=4000, seed=3)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)) * 3
    _, grad = run_grad(Inverted(module), x, g)
    err = (grad.double() - reference_grad(module, x, g)) / g.double().abs().clamp_min(1e-3)
    assert float(err.abs().max()) <= 2e-4


FEWBIT_CASES = [("gelu", 3), ("silu", 2), ("hardtanh", 3), ("relu", 1), ("softplus", 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name, bits", FEWBIT_CASES)
def test_fewbit_gradient_is_the_table_lookup(name, bits, dtype):
    module = ALL_MODULES[name]()
    x = _drop_border_ties(make_x(module, dtype, n=6000), module, bits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    y, grad = run_grad(FewBit(module, bits), x, g)
    assert torch.equal(y.detach(), module(x))
    assert grad.dtype == dtype
    assert torch.equal(grad, fewbit_expected_grad(module, bits, x, g))


def test_fewbit_relu_one_bit_is_exact():
    # ReLU's derivative takes two values with the jump at a border: one bit is exact.
    module = nn.ReLU()
    x = make_x(module, torch.float32)
    g = torch.randn(x.shape)
    _, grad = run_grad(FewBit(module, 1), x, g)
    assert torch.equal(grad, torch_grad(module, x, g))


def test_fewbit_fit_uses_the_table_of_the_observed_inputs():
    """fit(samples) swaps in the table fitted to those samples' density: the gradient is
    that table's lookup, and on inputs like the samples it is far closer to exact."""
    module = nn.GELU()
    g = torch.Generator().manual_seed(7)
    seen = torch.randn(4096, generator=g) * 2.1 - 1.8
    wrapper = FewBit(module, 3)
    assert wrapper.fit(seen) is wrapper and wrapper.fitted_on == 4096
    assert "fitted_on=4096" in repr(wrapper) and wrapper.state_dict() == {}
    table = optimal_table(from_module(module), 3, SampleDensity(seen))
    assert torch.equal(wrapper.borders, table.borders.float())
    assert torch.equal(wrapper.levels, table.levels.float())
    x = (torch.randn(100_000, generator=g) * 2.1 - 1.8).double()
    b32 = table.borders.float().double()
    x = x[~torch.isin(x, b32)]
    _, grad = run_grad(wrapper, x, torch.ones_like(x))
    assert torch.equal(grad, table.levels.float().double()[torch.bucketize(x, table.borders)])
    exact = reference_grad(module, x, torch.ones_like(x))
    _, normal = run_grad(FewBit(module, 3), x, torch.ones_like(x))
    assert (grad - exact).norm() < 0.6 * (normal - exact).norm()


def test_fewbit_refits_every_n_training_calls_and_in_flight_steps_keep_their_table():
    module = nn.GELU()
    wrapper = FewBit(module, 3, refit_every=2)
    g = torch.Generator().manual_seed(8)
    x1 = (torch.randn(3000, generator=g) * 0.2).requires_grad_(True)  # narrow, like an init
    x2 = (torch.randn(3000, generator=g) * 2 - 1).requires_grad_(True)  # wider, later
    normal = optimal_table(from_module(module), 3)
    y1 = wrapper(x1)  # call 1: no refit
    assert wrapper.fitted_on is None and torch.equal(wrapper.levels, normal.levels.float())
    with torch.no_grad():
        wrapper(x2)  # no grad: not a training call, nothing counted
    y2 = wrapper(x2)  # call 2: refit to x2 first
    fitted = optimal_table(from_module(module), 3, SampleDensity(x2.detach()))
    assert wrapper.fitted_on == 3000 and torch.equal(wrapper.levels, fitted.levels.float())
    (g1,) = torch.autograd.grad(y1.sum(), x1)  # step 1 saved the old table: it keeps it
    assert torch.equal(g1, normal.levels.float()[torch.bucketize(x1.detach().double(), normal.borders)])
    (g2,) = torch.autograd.grad(y2.sum(), x2)
    assert torch.equal(g2, fitted.levels.float()[torch.bucketize(x2.detach().double(), fitted.borders)])
    assert "refit_every=2" in repr(wrapper)


def test_fewbit_refits_at_doubling_intervals_up_to_the_cap(monkeypatch):
    from fewbit_fx import nn as fewbit_nn

    monkeypatch.setattr(fewbit_nn, "REFIT_INTERVAL_CAP", 4)
    wrapper = FewBit(nn.Tanh(), 1, refit_every=1)
    refits = []
    wrapper.fit = lambda x: refits.append(wrapper._calls)  # count, do not fit
    x = torch.randn(300, requires_grad=True)
    for _ in range(20):
        wrapper(x)
    assert refits == [1, 3, 7, 11, 15, 19]  # intervals 2, 4, then capped at 4 x 1
    small = FewBit(nn.Tanh(), 1, refit_every=1)
    small(torch.randn(10, requires_grad=True))  # too few inputs to fit: the table stays
    assert small.fitted_on is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, "10"])
def test_fewbit_bad_refit_every(bad):
    with pytest.raises(ValueError, match="refit_every must be a positive integer"):
        FewBit(nn.GELU(), 3, refit_every=bad)


def test_fewbit_large_inputs_are_subsampled_for_fitting():
    from fewbit_fx.nn import FIT_SAMPLES

    wrapper = FewBit(nn.SiLU(), 2).fit(torch.randn(FIT_SAMPLES + 1000))
    assert wrapper.fitted_on == FIT_SAMPLES


def test_fewbit_set_table_checks_the_number_of_levels():
    wrapper = FewBit(nn.SiLU(), 2)
    with pytest.raises(ValueError, match="bits=2 needs 4"):
        wrapper.set_table(optimal_table(from_module(nn.SiLU()), 3))


def test_fewbit_relative_error_decreases_with_bits():
    module = nn.GELU()
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    exact = reference_grad(module, x, torch.ones_like(x))
    errors = []
    for bits in (1, 2, 3, 4):
        _, grad = run_grad(FewBit(module, bits), x, torch.ones_like(x))
        rel = float((grad - exact).norm() / exact.norm())
        # Monte Carlo estimate of the table's own N(0, 1)-weighted relative RMS error.
        assert rel == pytest.approx(optimal_table(from_module(module), bits).rel_rmse, rel=0.05)
        errors.append(rel)
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.5 * errors[0]


# --- 3. shapes ------------------------------------------------------------------------------
def _leaf(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    shape = {"empty": (0,), "3x0": (3, 0), "0d": (), "n1": (1,), "n7": (7,), "n13": (13,),
             "3d": (2, 3, 5), "transposed": (5, 8), "step2": (26,)}[kind]
    return torch.randn(shape, generator=g) * 2


def _view(leaf: torch.Tensor, kind: str) -> torch.Tensor:
    """The tensor fed to the module: non-contiguous views for two kinds."""
    if kind == "transposed":
        return leaf.t()
    if kind == "step2":
        return leaf[::2]
    return leaf


SHAPES = ["empty", "3x0", "0d", "n1", "n7", "n13", "3d", "transposed", "step2"]


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("name", ["gelu", "sigmoid"])
def test_inverted_shapes(kind, name):
    module = ALL_MODULES[name]()
    leaf = _leaf(kind).requires_grad_(True)
    x = _view(leaf, kind)
    assert x.is_contiguous() == (kind not in ("transposed", "step2"))
    y = Inverted(module)(x)
    assert y.shape == x.shape
    assert torch.equal(y.detach(), module(x.detach()))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    y.backward(g)
    leaf_ref = leaf.detach().double().requires_grad_(True)
    module(_view(leaf_ref, kind)).backward(g.double())
    assert leaf.grad.shape == leaf.shape
    assert torch.allclose(leaf.grad.double(), leaf_ref.grad, rtol=0, atol=2e-4)


@pytest.mark.parametrize("kind", SHAPES)
def test_fewbit_shapes(kind):
    module, bits = nn.GELU(), 3
    leaf = _leaf(kind).requires_grad_(True)
    x = _view(leaf, kind)
    y = FewBit(module, bits)(x)
    assert y.shape == x.shape
    assert torch.equal(y.detach(), module(x.detach()))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    y.backward(g)
    expected = torch.zeros_like(leaf)
    _view(expected, kind).copy_(fewbit_expected_grad(module, bits, x, g))
    assert torch.equal(leaf.grad, expected)


# --- 4. errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("wrapper", [FewBit, Inverted])
def test_unsupported_module_names_supported(wrapper):
    with pytest.raises(TypeError, match="supported") as info:
        wrapper(nn.Softmax(dim=-1))
    msg = str(info.value)
    assert "Softmax" in msg
    for name in ("GELU", "SiLU", "ReLU", "Sigmoid"):
        assert name in msg


@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True])
def test_fewbit_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        FewBit(nn.GELU(), bits=bits)


@pytest.mark.parametrize("wrapper", [FewBit, Inverted])
@pytest.mark.parametrize("beta", [0.0, float("nan"), float("inf")])
def test_softplus_beta_must_be_finite_and_nonzero(wrapper, beta):
    # beta = 0 used to raise ZeroDivisionError (threshold / beta) from deep inside.
    with pytest.raises(ValueError, match="beta must be a finite nonzero number"):
        wrapper(nn.Softplus(beta=beta))


@pytest.mark.parametrize("bits", [np.int64(3), np.int32(2), np.uint8(1)])
def test_fewbit_accepts_numpy_integer_bits(bits):
    from fewbit_fx.packing import check_bits, pack

    assert check_bits(bits) == int(bits) and type(check_bits(bits)) is int
    m = FewBit(nn.GELU(), bits=bits)
    assert m.bits == int(bits) and type(m.bits) is int and m.levels.numel() == 2 ** int(bits)
    assert optimal_table(from_module(nn.GELU()), bits).levels.numel() == 2 ** int(bits)
    assert pack(torch.zeros(8, dtype=torch.uint8), bits).numel() == int(bits)
    x = torch.randn(16, requires_grad=True)
    m(x).sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("alpha", [-0.5, -1.0])
def test_inverted_rejects_non_monotone_elu(alpha):
    with pytest.raises(ValueError, match="alpha"):
        Inverted(nn.ELU(alpha=alpha))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("variant", ["fewbit", "inverted"])
@pytest.mark.parametrize("name", ["gelu", "relu"])
def test_integer_input_is_a_type_error(name, variant, dtype, stub_tables):
    module = ALL_MODULES[name]()
    wrapper = FewBit(module) if variant == "fewbit" else Inverted(module)
    with pytest.raises(TypeError, match="floating-point"):
        wrapper(torch.arange(6).to(dtype))


@pytest.mark.parametrize("name", ["gelu", "sigmoid", "relu"])
def test_inverted_double_backward_is_refused(name):
    module = ALL_MODULES[name]()
    x = make_x(module, torch.float32, n=64).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(Inverted(module)(x).sum(), x, create_graph=True)


def test_fewbit_double_backward_without_upstream_parameters_is_refused():
    # Without the refusal at create_graph time, the few-bit gradient grad * levels[code]
    # would have no graph here (d sum / dy = ones needs no grad), and a loss built from it
    # would silently drop this activation's dependence on x.
    x = make_x(nn.GELU(), torch.float32, n=64).requires_grad_(True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(FewBit(nn.GELU(), 2)(x).sum(), x, create_graph=True)


@pytest.mark.parametrize("variant", ["fewbit", "inverted"])
def test_double_backward_is_refused_with_upstream_parameters(variant):
    # The usual case: a gradient penalty through a small network.
    torch.manual_seed(10)
    act = FewBit(nn.GELU(), 2) if variant == "fewbit" else Inverted(nn.GELU())
    model = nn.Sequential(nn.Linear(4, 8), act, nn.Linear(8, 1))
    x = torch.randn(5, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(model(x).sum(), x, create_graph=True)
    # A grad_outputs that requires grad reaches the activation's backward directly.
    x2 = torch.randn(6, requires_grad=True)
    v = torch.ones(6, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(act(x2), x2, v, create_graph=True)
    # Plain first-order backward still works.
    (g3,) = torch.autograd.grad(act(x2), x2, v)
    assert torch.isfinite(g3).all()


@pytest.mark.parametrize("name", ["gelu", "sigmoid", "tanhshrink"])
def test_inverted_output_modified_in_place_is_an_error(name):
    module = ALL_MODULES[name]()
    x = make_x(module, torch.float32, n=64).requires_grad_(True)
    y = Inverted(module)(x)
    y.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    # The same through an in-place successor layer.
    y = Inverted(module)(x)
    z = nn.ReLU(inplace=True)(y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.sum().backward()


def test_fewbit_output_modified_in_place_keeps_correct_gradients():
    # FewBit does not keep y (nor does nn.GELU, which keeps x): modifying y is legal and the
    # gradient is the chain rule through the modification, exactly.
    module, bits = nn.GELU(), 3
    x = make_x(module, torch.float32, n=500).requires_grad_(True)
    y = FewBit(module, bits)(x)
    y.mul_(2)
    y.sum().backward()
    expected = fewbit_expected_grad(module, bits, x, 2 * torch.ones_like(x))
    assert torch.equal(x.grad, expected)


# --- 5. torch.compile -----------------------------------------------------------------------
def _compile_check(act: nn.Module, grad_tol: float):
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 4))
    x = torch.randn(8, 16) * 2
    eager = model(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert torch.allclose(out, eager, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    for p, ref in zip(model.parameters(), eager_grads):
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=grad_tol), float((p.grad - ref).abs().max())
    return model, compiled, x


def test_compile_fewbit_gelu():
    model, compiled, x = _compile_check(FewBit(nn.GELU(), bits=3), grad_tol=1e-5)
    # The compiled step keeps what the eager one keeps: x, the GELU output (for the second
    # Linear) and 3-bit codes, not the GELU input (saved_tensors_hooks see compiled steps).
    from fewbit_fx.measure import saved_bytes

    excluded = list(model.parameters()) + list(model.buffers())
    eager = saved_bytes(lambda: model(x).sum(), exclude=excluded)
    traced = saved_bytes(lambda: compiled(x).sum(), exclude=excluded)
    traced.loss.backward()
    assert traced.bytes <= eager.bytes == (8 * 16 + 8 * 32) * 4 + math.ceil(8 * 32 * 3 / 8) + 1


def test_compiled_fewbit_with_refit_every_does_not_refit_or_recompile():
    wrapper = FewBit(nn.GELU(), bits=2, refit_every=1)
    compiled = torch.compile(wrapper, backend="inductor", fullgraph=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = torch.randn(64, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
            compiled(x).sum().backward()
    assert wrapper.fitted_on is None and wrapper._calls == 0


def test_compile_inverted_silu():
    _compile_check(Inverted(nn.SiLU()), grad_tol=1e-4)


# --- 6. torch.func ------------------------------------------------------------------------------
# The custom ops' autograd has no setup_context, which torch.func refuses ("must override
# the setup_context staticmethod"); under a transform the modules use
# fewbit_fx.ops.transforms, with the same backward.
FUNC_CASES = {
    "fewbit_gelu": lambda: FewBit(nn.GELU(), bits=2),
    "fewbit_sigmoid": lambda: FewBit(nn.Sigmoid(), bits=3),
    "inverted_gelu": lambda: Inverted(nn.GELU()),
    "inverted_hardswish": lambda: Inverted(nn.Hardswish()),
    "inverted_softplus": lambda: Inverted(nn.Softplus(beta=-2, threshold=1)),
    "inverted_tanhshrink": lambda: Inverted(nn.Tanhshrink()),
}


def _func_model(case: str) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(4, 6), FUNC_CASES[case](), nn.Linear(6, 2))


@pytest.mark.parametrize("case", FUNC_CASES)
def test_torch_func_transforms_give_autograds_gradients(case):
    from torch.func import functional_call, grad, jacrev, vmap

    model = _func_model(case)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_(True)
    model(xr).sum().backward()
    torch.testing.assert_close(grad(lambda t: model(t).sum())(x), xr.grad, rtol=0, atol=0)
    per_sample = vmap(grad(lambda t: model(t).sum()))(x)  # each row alone: the same numbers
    torch.testing.assert_close(per_sample, xr.grad, rtol=0, atol=1e-7)
    jac = jacrev(model)(x)  # (5, 2, 5, 4): vmap over the backward
    rows = []
    for out in range(2):
        xo = x.clone().requires_grad_(True)
        model(xo)[:, out].sum().backward()
        rows.append(xo.grad)
    torch.testing.assert_close(jac.sum(0), torch.stack(rows), rtol=0, atol=1e-6)
    params = {k: v.detach() for k, v in model.named_parameters()}
    got = grad(lambda p: functional_call(model, p, (x,)).sum())(params)
    model.zero_grad()
    model(x).sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["fewbit_gelu", "inverted_gelu"])
def test_torch_func_second_derivatives_are_refused(case):
    from torch.func import grad, hessian, jvp

    model = _func_model(case)
    x = torch.randn(3, 4)
    f = lambda t: model(t).sum()  # noqa: E731
    for second in (lambda: grad(lambda t: grad(f)(t).sum())(x), lambda: hessian(f)(x),
                   lambda: jvp(grad(f), (x,), (x,))):
        with pytest.raises(RuntimeError, match="double backward"):
            second()


def test_torch_func_forward_mode_alone_runs_the_plain_activation():
    from torch.func import jvp

    model = _func_model("fewbit_gelu")
    x, t = torch.randn(3, 4), torch.randn(3, 4)
    plain = nn.Sequential(model[0], nn.GELU(), model[2])
    torch.testing.assert_close(jvp(model, (x,), (t,))[1], jvp(plain, (x,), (t,))[1])
