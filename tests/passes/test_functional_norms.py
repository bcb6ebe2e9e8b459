"""Functional norm sites (#15 part 3, `norms=True`): `F.layer_norm` / `F.rms_norm` called in
a module's own forward are rewritten at their call site (passes/source_rewrite) to
InvertedNormCall with the call's own weight and bias, only when the call matches the plan;
and F.rms_norm's estimate counts what the op keeps (x, or an fp32 copy of half x, and
x*rstd in fp32), so it is the measured saving."""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from _training import grads as _grads
from fewbit_fx.measure import measure_step
from fewbit_fx.nn import InvertedNormCall

D = 64


class Functional(nn.Module):
    """A block that normalizes with functional calls and its own parameters; the second
    call's shape, weight and bias are switchable, to run calls that do not match the plan."""

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(16, D), nn.Linear(D, D), nn.Linear(D, 8)
        self.ln_weight = nn.Parameter(torch.rand(D) + 0.5)
        self.ln_bias = nn.Parameter(torch.rand(D) * 0.4 - 0.2)
        self.rms_weight = nn.Parameter(torch.rand(D) + 0.5)
        self.groups, self.use_weight = 1, True

    def forward(self, x):
        h = F.layer_norm(self.up(x), (D,), self.ln_weight, self.ln_bias, 1e-5)
        h = self.mid(h)
        n = D // self.groups
        w = self.rms_weight if self.use_weight and self.groups == 1 else None
        h = F.rms_norm(h.view(*h.shape[:-1], self.groups, n), (n,), w, eps=1e-6).flatten(-2)
        return self.down(h)


def _x(dtype=torch.float32):
    return torch.randn(256, 16, generator=torch.Generator().manual_seed(0)).to(dtype)


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return Functional().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_functional_norms_are_inverted_and_forward_is_unchanged(dtype):
    model, x = _model(dtype), _x(dtype)
    r = fewbit_fx.report(model, example_inputs=(x,), mode="exact", norms=True)
    rows = {row.site: row for row in r.rows}
    assert set(rows) == {"<root>:layer_norm#0", "<root>:rms_norm#1"}
    assert [(row.activation, row.variant) for row in rows.values()] == [
        ("layer_norm", "inverted"), ("rms_norm", "inverted")]
    assert "mid" in rows["<root>:layer_norm#0"].reason and "down" in rows["<root>:rms_norm#1"].reason
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    children = [m for m in optimized.modules() if isinstance(m, InvertedNormCall)]
    assert len(children) == 2 and not any(list(c.parameters()) for c in children)  # no copies
    assert list(optimized.state_dict()) == list(model.state_dict())
    assert torch.equal(optimized(x), model(x))
    assert measure_step(optimized, (x,), {}) < measure_step(model, (x,), {})
    assert not any(isinstance(m, InvertedNormCall) for m in
                   fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact").modules())


def test_gradients_within_torchs_own_fp32_error():
    model, x = _model(), _x()
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    exact = _grads(copy.deepcopy(model).double(), x.double())
    for got, plain, want in zip(_grads(optimized, x), _grads(model, x), exact):
        err, torch_err = ((g.double() - want).norm() / want.norm() for g in (got, plain))
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)


def _site_savings(model, x):
    """Per site: (estimated bytes saved, measured with only that site rewritten)."""
    r = fewbit_fx.report(model, example_inputs=(x,), mode="exact", norms=True)
    before = measure_step(copy.deepcopy(model), (x,), {})
    out = {}
    for row in r.rows:
        only = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True,
                                  overrides={row.site: "exact", "*": "keep"})
        out[row.site] = (row.saved_before - row.saved_after, before - measure_step(only, (x,), {}))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_norm_estimate_is_the_measured_saving(dtype):
    savings = _site_savings(_model(dtype), _x(dtype))
    assert len(savings) == 2
    for site, (estimate, measured) in savings.items():
        assert measured > 0 and abs(estimate - measured) <= 0.01 * measured, (site, estimate, measured)
    # F.rms_norm keeps x (an fp32 copy of half x) and x*rstd in fp32: more than x
    estimate, _ = savings["<root>:rms_norm#1"]
    assert estimate >= 256 * D * 8 if dtype == torch.bfloat16 else estimate >= 2 * 256 * D * 4


def test_calls_that_do_not_match_the_plan_run_as_written():
    model, x = _model(), _x()
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    calls = []
    for child in optimized.modules():
        if isinstance(child, InvertedNormCall):
            child.register_forward_hook(lambda m, args, out: calls.append(m.kind))
    xr = x.clone().requires_grad_(True)
    optimized(xr).sum().backward()
    assert sorted(calls) == ["layer_norm", "rms_norm"]
    for change in ({"groups": 4}, {"use_weight": False}):  # another shape; no weight
        calls.clear()
        for m in (optimized, model):
            m.groups, m.use_weight = 1, True
            for k, v in change.items():
                setattr(m, k, v)
        assert torch.equal(optimized(x), model(x)), change
        assert calls == ["layer_norm"], change  # the rms_norm call ran unchanged
        _grads(optimized, x)  # and trains


def test_uses_the_owners_parameters_after_copy_and_pickle():
    model, x = _model(), _x()
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    buf = io.BytesIO()
    torch.save(optimized, buf)
    buf.seek(0)
    for copied in (copy.deepcopy(optimized), pickle.loads(pickle.dumps(optimized)),
                   torch.load(buf, weights_only=False)):
        assert sum(isinstance(m, InvertedNormCall) for m in copied.modules()) == 2
        with torch.no_grad():
            copied.rms_weight.mul_(2)
            copied.ln_bias.add_(1)
        reference = copy.deepcopy(model)
        reference.load_state_dict(copied.state_dict())
        assert torch.equal(copied(x), reference(x))
        assert torch.equal(optimized(x), model(x))  # the original is untouched
        for got, want in zip(_grads(copied, x), _grads(reference, x)):
            assert float((got - want).norm() / want.norm()) < 1e-5


def test_a_functional_norm_whose_output_nobody_keeps_stays():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.weight = nn.Linear(16, D), nn.Parameter(torch.ones(D))

        def forward(self, x):
            h = self.up(x)
            return (h + F.layer_norm(h, (D,), self.weight)).sum(-1)

    r = fewbit_fx.report(Residual(), example_inputs=(_x(),), mode="exact", norms=True)
    (row,) = r.rows
    assert row.activation == "layer_norm" and row.variant == "kept"
    assert "no consumer keeps its output" in row.reason


class OwnLayerNorm(nn.Module):
    """A user's norm module written with F.layer_norm (no nn.LayerNorm): its call is a
    functional site inside it, rewritten in its own forward."""

    def __init__(self, d, eps=1e-5):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.zeros(d)), eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def test_a_users_norm_module_written_with_a_functional_call():
    model = nn.Sequential(nn.Linear(16, D), OwnLayerNorm(D), nn.Linear(D, 8))
    x = _x()
    r = fewbit_fx.report(model, example_inputs=(x,), mode="exact", norms=True)
    (row,) = r.rows
    assert (row.site, row.activation, row.variant) == ("1:layer_norm#0", "layer_norm", "inverted")
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    assert isinstance(optimized[1], OwnLayerNorm)
    assert isinstance(optimized[1].fewbit_layer_norm_0, InvertedNormCall)
    assert torch.equal(optimized(x), model(x))
    assert r.measured_before - r.measured_after == row.saved_before - row.saved_after
