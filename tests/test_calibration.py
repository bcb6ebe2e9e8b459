"""Calibration: optimize()/report() fit each new few-bit table to the inputs that site sees."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from fewbit_fx import calibration
from fewbit_fx.activations import from_module
from fewbit_fx.nn import REFIT_EVERY, FewBit
from fewbit_fx.tables import SampleDensity, optimal_table


class Shifted(nn.Module):
    """Pre-activations far from N(0, 1), like a trained network's: mean -2, std ~2.
    One module site (act) and one functional site (F.silu); the frozen output layer keeps
    nothing of the activations, so few-bit is what auto picks."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.mid = nn.Linear(4 * d, 4 * d)
        self.out = nn.Linear(4 * d, d).requires_grad_(False)
        with torch.no_grad():
            self.fc.weight.normal_(0, 2 / d**0.5)
            self.fc.bias.fill_(-2.0)
            self.mid.bias.fill_(-2.0)

    def forward(self, x):
        h = self.act(self.fc(x))
        return self.out(F.silu(self.mid(h)))


def batch(n: int = 64, d: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def fewbit_modules(model: nn.Module) -> list[FewBit]:
    return [m for m in model.modules() if isinstance(m, FewBit)]


def input_grad_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    def grad(m):
        xr = x.clone().requires_grad_(True)
        m(xr).square().sum().backward()
        return xr.grad

    exact = grad(reference)
    return float((grad(model) - exact).norm() / exact.norm())


def test_optimize_fits_every_new_fewbit_table_and_says_so():
    model = Shifted()
    fewbit_fx.optimize(model, example_inputs=(batch(),), mode="fewbit")
    modules = fewbit_modules(model)
    assert len(modules) == 2  # the GELU module and the functional SiLU
    assert all(m.fitted_on == 64 * 128 for m in modules)
    assert all(m.refit_every == REFIT_EVERY for m in modules)  # and they track training
    rep = fewbit_fx.report(model)
    assert all("table fitted to 8192 observed inputs" in r.reason for r in rep.rows)
    assert any("fitted to the example inputs at 2 of 2 sites" in n for n in rep.notes)


def test_fitted_tables_give_closer_gradients_on_unseen_inputs():
    torch.manual_seed(0)
    base = Shifted()
    fitted, normal = Shifted(), Shifted()
    fitted.load_state_dict(base.state_dict())
    normal.load_state_dict(base.state_dict())
    fewbit_fx.optimize(fitted, example_inputs=(batch(seed=1),), mode="fewbit", bits=3)
    fewbit_fx.optimize(normal, example_inputs=(batch(seed=1),), mode="fewbit", bits=3, tables="normal")
    x = batch(512, seed=2)  # not the calibration batch
    e_fitted, e_normal = input_grad_error(fitted, base, x), input_grad_error(normal, base, x)
    assert e_fitted < 0.7 * e_normal, (e_fitted, e_normal)


def test_normal_tables_are_the_standard_ones():
    model = Shifted()
    fewbit_fx.optimize(model, example_inputs=(batch(),), mode="fewbit", bits=2, tables="normal")
    for m in fewbit_modules(model):
        assert m.fitted_on is None and m.refit_every is None
        assert torch.equal(m.levels, optimal_table(m.activation, 2).levels.float())
    assert any("tables='normal'" in n for n in fewbit_fx.report(model).notes)


def test_too_few_inputs_keep_the_normal_table_and_say_why():
    model = Shifted(d=4)  # 2 x 16 = 32 activations per site: below MIN_SAMPLES
    fewbit_fx.optimize(model, example_inputs=(batch(2, 4),), mode="fewbit")
    for m in fewbit_modules(model):
        assert m.fitted_on is None
        assert torch.equal(m.levels, optimal_table(m.activation, 3).levels.float())
    rep = fewbit_fx.report(model)
    assert all(f"only 32 inputs observed (< {calibration.MIN_SAMPLES})" in r.reason for r in rep.rows)


def test_a_module_called_twice_pools_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 64)
            self.c = nn.Linear(64, 8).requires_grad_(False)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.c(self.act(self.b(self.act(self.a(x)))))

    model = Twice()
    fewbit_fx.optimize(model, example_inputs=(torch.randn(32, 16),), mode="fewbit")
    assert model.act.fitted_on == 2 * 32 * 64


def test_calibration_leaves_no_trace_on_model_or_rng():
    class WithState(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(16, 64), nn.BatchNorm1d(64)
            self.act, self.drop = nn.SiLU(), nn.Dropout(0.5)
            self.out = nn.Linear(64, 4).requires_grad_(False)

        def forward(self, x):
            return self.out(self.drop(self.act(self.bn(self.fc(x)))))

    model = WithState()
    x = torch.randn(128, 16)
    stats = model.bn.running_mean.clone()
    torch.manual_seed(3)
    expected_next = torch.rand(4)
    torch.manual_seed(3)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="fewbit")
    assert torch.equal(torch.rand(4), expected_next)
    assert torch.equal(model.bn.running_mean, stats)
    assert model.act.fitted_on == 128 * 64


def test_report_fits_a_copy_and_leaves_the_model_alone():
    model = Shifted()
    rep = fewbit_fx.report(model, example_inputs=(batch(),), mode="fewbit")
    assert isinstance(model.act, nn.GELU)
    assert all("table fitted" in r.reason for r in rep.rows)
    assert "table fitted" in str(rep) and "table fitted" in rep.to_json()


def test_large_inputs_are_subsampled_per_call():
    samples = calibration.record_inputs(
        nn.Sequential(act := FewBit(nn.GELU())), [act], (torch.randn(2 * calibration.PER_CALL),), {})
    assert samples[id(act)].numel() == calibration.PER_CALL


def test_the_fitted_table_is_the_one_for_the_recorded_samples():
    model = Shifted()
    x = batch()
    samples = calibration.record_inputs(model, [model.act], (x,), {})[id(model.act)]
    assert torch.equal(samples, model.fc(x).detach().reshape(-1))
    fewbit_fx.optimize(model, example_inputs=(x,), mode="fewbit")
    table = optimal_table(from_module(nn.GELU()), 3, SampleDensity(samples))
    assert torch.equal(model.act.borders, table.borders.float())


@pytest.mark.parametrize("bad", ["Normal", "fit", None])
def test_bad_tables_argument_names_the_choices(bad):
    with pytest.raises(ValueError, match="tables must be one of"):
        fewbit_fx.optimize(Shifted(), example_inputs=(batch(),), tables=bad)
    with pytest.raises(ValueError, match="tables must be one of"):
        fewbit_fx.report(Shifted(), example_inputs=(batch(),), tables=bad)


def test_lazy_optimize_fits_on_the_first_call():
    model = fewbit_fx.optimize(Shifted(), mode="fewbit")
    model(batch())
    assert all(m.fitted_on == 64 * 128 for m in fewbit_modules(model))


def test_compiling_an_optimized_model_uses_its_fitted_tables():
    """torch.compile of an optimize()d model reads the FewBit buffers, so the fitted tables
    (not the N(0, 1) ones the backend would build) decide its gradients."""
    torch.manual_seed(0)
    model = Shifted()
    fewbit_fx.optimize(model, example_inputs=(batch(),), mode="fewbit")
    x = batch(128, seed=3)

    def input_grad(m):
        xr = x.clone().requires_grad_(True)
        m(xr).square().sum().backward()
        return xr.grad

    eager = input_grad(model)
    compiled = input_grad(torch.compile(model, backend="inductor"))
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    normal = Shifted()
    normal.load_state_dict(model.state_dict())
    fewbit_fx.optimize(normal, example_inputs=(batch(),), mode="fewbit", tables="normal")
    assert (input_grad(normal) - eager).abs().max() > 1e-2  # the tables do matter here


def test_a_failing_calibration_forward_keeps_the_rewrite_and_warns(monkeypatch):
    model = Shifted()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(calibration, "record_inputs", broken)
    with pytest.warns(RuntimeWarning, match="could not run the model to fit the few-bit tables"):
        fewbit_fx.optimize(model, example_inputs=(batch(),), mode="fewbit")
    assert isinstance(model.act, FewBit) and model.act.fitted_on is None
    assert any("fitting failed" in n for n in fewbit_fx.report(model).notes)


def test_descriptions_never_print_nan():
    assert "no input reached it" in calibration.Calibration(0, False, float("nan"), None).describe()
    assert "only 9 inputs" in calibration.Calibration(9, False, 0.1, None).describe()
    assert "fitted to 999 observed inputs" in calibration.Calibration(999, True, 0.2, 0.1).describe()
