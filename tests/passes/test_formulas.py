"""Activations written as formulas in users' own classes (passes/formulas): found by graph
pattern whatever the class is called, one site each, swapped for a module whose forward is
the user's op sequence bit for bit, with the inverted/few-bit backward; look-alikes stay."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from fewbit_fx import activations
from fewbit_fx.activations import formulas as f64
from fewbit_fx.inverse import bisect
from fewbit_fx.measure import measure_step
from fewbit_fx.nn import FewBit, Inverted
from fewbit_fx.passes import capture, formulas
from _training import D, MLP, x_in
from _training import assert_exact_gradients_at_the_floor, sites_of as _sites


class Act(nn.Module):
    """An activation module of the user's, named like nothing: its forward is `fn`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


_K = math.sqrt(2 / math.pi)

# (spelling, registry entry, its parameters, report label)
SPELLINGS = [
    (lambda x: x * torch.sigmoid(x), "swish", {}, "swish(beta=1) formula"),
    (lambda x: torch.sigmoid(x) * x, "swish", {}, "swish(beta=1) formula"),
    (lambda x: x * x.sigmoid(), "swish", {}, "swish(beta=1) formula"),
    (lambda x: x * F.sigmoid(x), "swish", {}, "swish(beta=1) formula"),
    (lambda x: x * torch.sigmoid(1.0 * x), "swish", {}, "swish(beta=1) formula"),
    (lambda x: x * torch.sigmoid(2.0 * x), "swish", {"beta": 2.0}, "swish(beta=2) formula"),
    (lambda x: x * (x * 0.5).sigmoid(), "swish", {"beta": 0.5}, "swish(beta=0.5) formula"),
    (lambda x: torch.sigmoid(0.1 * x) * x, "swish", {"beta": 0.1}, "swish(beta=0.1) formula"),
    (lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu", {}, "quick_gelu formula"),
    (lambda x: torch.sigmoid(x * 1.702) * x, "quick_gelu", {}, "quick_gelu formula"),
    (lambda x: x * torch.tanh(F.softplus(x)), "mish_formula", {}, "mish formula"),
    (lambda x: F.softplus(x).tanh() * x, "mish_formula", {}, "mish formula"),
    (lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3)))),
     "gelu_tanh_formula", {}, "gelu_tanh formula"),
    (lambda x: 0.5 * x * (1 + torch.tanh(_K * (x + 0.044715 * x ** 3))), "gelu_tanh_formula", {},
     "gelu_tanh formula"),
    (lambda x: x * 0.5 * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3)))),
     "gelu_tanh_pow_formula", {"k": 0.7978845608}, "gelu_tanh_pow(k=0.797885, c=0.044715) formula"),
    (lambda x: x * 0.5 * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x * x * x))),
     "gelu_tanh_cube_formula", {"k": 0.7978845608}, "gelu_tanh_cube(k=0.797885, c=0.044715) formula"),
    (lambda x: x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))),  # Megatron's
     "gelu_tanh_fast_formula", {"k": 0.79788456}, "gelu_tanh_fast(k=0.797885, c=0.044715) formula"),
    (lambda x: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),  # HF FastGELU's
     "gelu_fast_formula", {}, "gelu_fast formula"),
    (lambda x: x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))), "gelu_erf_formula", {}, "gelu_erf formula"),
]
IDS = [f"{i}-{s[1]}" for i, s in enumerate(SPELLINGS)]


@pytest.mark.parametrize("fn, name, params, label", SPELLINGS, ids=IDS)
def test_each_spelling_is_one_module_site(fn, name, params, label):
    (site,) = _sites(MLP(Act(fn)), x_in())
    assert site.activation == activations.get(name, **params)
    assert site.module_path == "act" and site.formula and site.kind == label
    assert capture.innermost_module(site.input)[0] == "fc1"
    assert len(site.nodes) >= 2


@pytest.mark.parametrize("fn, name, params, label", SPELLINGS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optimized_forward_is_bit_for_bit_the_users(fn, name, params, label, dtype):
    model = MLP(Act(fn)).to(dtype)
    x = x_in(dtype=dtype)
    expected = model(x)
    for mode in ("exact", "fewbit"):
        fewbit_fx.optimize(model, example_inputs=(x,), mode=mode)
        assert isinstance(model.act, Inverted if mode == "exact" else FewBit)
        assert torch.equal(model(x), expected)
        assert torch.equal(model.act(x * 3), fn(x * 3))  # the module alone, wider inputs


@pytest.mark.parametrize("fn, name, params, label", SPELLINGS, ids=IDS)
def test_exact_gradients_are_at_the_floor(fn, name, params, label):
    """Against float64 autograd of the user's own module: as close as fp32 autograd of it
    (the original keeps x, so its error is fp32 rounding only), plus the inverse's floor."""
    assert_exact_gradients_at_the_floor(MLP(Act(fn)), x_in())


@pytest.mark.parametrize("fn, name, params, label", SPELLINGS[::3], ids=IDS[::3])
def test_measured_saving_is_what_the_report_estimated(fn, name, params, label):
    model = MLP(Act(fn))
    rep = fewbit_fx.report(model, example_inputs=(x_in(),))
    (row,) = rep.rows
    assert row.activation == label and row.variant == "inverted"
    estimated = rep.total_before - rep.total_after
    measured = rep.measured_before - rep.measured_after
    assert estimated > 0 and abs(measured - estimated) <= 0.01 * estimated, (measured, estimated)
    assert str(rep).count(label) == 1
    # and the same through optimize + measure_step on the model itself
    before = measure_step(model, (x_in(),), {})
    fewbit_fx.optimize(model, example_inputs=(x_in(),))
    after = measure_step(model, (x_in(),), {})
    assert abs((before - after) - estimated) <= 0.01 * estimated


# --- look-alikes -------------------------------------------------------------------------

class Gate(nn.Module):
    """x * sigmoid(y) with y another tensor: a gate, not a swish."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4 * D, 4 * D)

    def forward(self, x):
        return x * torch.sigmoid(self.fc(x))


class LearnedBeta(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


def _shared_intermediate(x):
    s = torch.sigmoid(x)
    return x * s + s


LOOK_ALIKES = [
    (lambda x: x * torch.sigmoid(2.0 * x + 1.0), "sigmoid(a x + b)"),
    (lambda x: x * torch.sigmoid(x * x), "sigmoid(x^2)"),
    (lambda x: x * torch.sigmoid(-1.0 * x), "beta < 0"),
    (_shared_intermediate, "sigmoid used twice"),
    (lambda x: 0.5 * x * (1 + torch.tanh(0.8 * (x + 0.044715 * x ** 3))), "another k"),
    (lambda x: x * (0.5 * (1 + torch.tanh(_K * (x + 0.044715 * x ** 3)))), "another rounding"),
    (lambda x: x * torch.tanh(F.softplus(x, beta=2.0)), "softplus with beta"),
]


@pytest.mark.parametrize("fn, why", LOOK_ALIKES, ids=[w for _, w in LOOK_ALIKES])
def test_look_alikes_stay_as_they_are(fn, why):
    sites = _sites(MLP(Act(fn)), x_in())
    assert not any(s.formula for s in sites), [s.kind for s in sites]
    assert {s.activation.name for s in sites} <= {"sigmoid", "tanh", "softplus"}
    assert all(s.module_path is None for s in sites)


@pytest.mark.parametrize("act", [Gate, LearnedBeta], ids=["gate", "learned beta"])
def test_gates_and_learned_betas_are_not_swishes(act):
    sites = _sites(MLP(act()), x_in())
    assert [(s.activation.name, s.formula) for s in sites] == [("sigmoid", False)]


def test_a_formula_followed_by_more_is_found_but_not_swapped():
    """x * sigmoid(x) + 1: the swish is a site (the add is not part of it), but the module
    computes more than the formula, so it is not swapped; the report says why."""
    model = MLP(Act(lambda x: x * torch.sigmoid(x) + 1))
    (site,) = _sites(model, x_in())
    assert site.formula and site.activation == activations.get("swish")
    assert site.module_path is None and site.owner_path == "act"
    assert [n.target.__name__ for n in site.nodes] == ["sigmoid", "mul"]
    rep = fewbit_fx.report(model, example_inputs=(x_in(),))
    (row,) = rep.rows
    assert row.variant == "kept" and "written inline" in row.reason and "would be fewbit-3" in row.reason  # fc2 keeps y + 1, not y
    assert rep.measured_after == rep.measured_before


class InlineQuickGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, 4 * D), nn.Linear(4 * D, D)

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h)
        return self.fc2(h)


def test_an_inline_formula_is_reported_with_its_reason_and_left_alone():
    model = InlineQuickGelu()
    x = x_in()
    expected = model(x)
    rep = fewbit_fx.report(model, example_inputs=(x,))
    (row,) = rep.rows
    assert row.site == "<root>:quick_gelu#0" and row.activation == "quick_gelu formula"
    assert row.variant == "kept" and row.saved_after == row.saved_before > 0
    assert f"forward() at test_formulas.py:{InlineQuickGelu.forward.__code__.co_firstlineno + 2}" in row.reason
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert "forward" not in vars(model) and torch.equal(model(x), expected)


class WidthDependent(nn.Module):
    def forward(self, x):
        y = x * torch.sigmoid(x)
        return y if x.shape[-1] == 4 * D else y * 2


class TwoCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(D, 4 * D), nn.Linear(4 * D, D), WidthDependent()

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_a_module_is_swapped_only_if_every_call_is_the_formula():
    sites = _sites(TwoCalls(), x_in())
    assert [(s.formula, s.module_path, s.owner_path) for s in sites] == [(True, None, "act")] * 2
    assert len({s.rewrite_key for s in sites}) == 2
    rep = fewbit_fx.report(TwoCalls(), example_inputs=(x_in(),), measure=False)
    assert all(r.variant == "kept" and "written inline" in r.reason for r in rep.rows)
    # the call that is the whole formula says why its module is not swapped all the same
    assert sum("act is not swapped: not every call of it computes" in r.reason for r in rep.rows) == 1


def _swish_of_swish(x):
    s = x * torch.sigmoid(x)
    return s * torch.sigmoid(s)


def test_nested_formulas_are_two_sites():
    inner, outer = _sites(MLP(Act(_swish_of_swish)), x_in())
    assert outer.formula and inner.formula and outer.input is inner.output
    assert inner.module_path is None and outer.module_path is None  # together they are the module


def test_every_formula_entry_is_its_own_pattern():
    """The patterns are the registry's forwards, traced: each formula entry has one, and
    each parameter is a constant of it (else matching could not read it back)."""
    names = {p.name for p in formulas.patterns()}
    assert names == {n for n, s in activations.SPECS.items() if s.formula}
    sizes = [p.size for p in formulas.patterns()]
    assert sizes == sorted(sizes, reverse=True)


# --- the scaled SiLU inverse at its floor ---------------------------------------------------

@pytest.mark.parametrize("beta", [0.1, 0.5, 1.0, 1.702, 2.5])
def test_swish_inverse_is_at_the_fp32_floor(beta):
    """swish(beta) = silu(beta x) / beta: the SiLU inverse of beta * y. floor: what the exact
    float64 inverse of the stored y (the user's formula in fp32: up to three roundings, so
    ~2.5x the floor of a correctly rounded y next to the minimum) loses; ours must be
    within 10% of it, and 5e-7 of it away from the minimum (as tests/test_inverse.py)."""
    a = activations.get("swish", beta=beta)
    g = torch.Generator().manual_seed(1)
    x_min = a.x_min
    x = torch.cat([2.0 / beta * torch.randn(20000, generator=g, dtype=torch.float64),
                   x_min + torch.linspace(-1e-3, 1e-3, 2001, dtype=torch.float64),
                   torch.linspace(-30 / beta, 30 / beta, 2001, dtype=torch.float64)]).float().double()

    def f(v):
        return f64.silu(beta * v) / beta

    def slope(v):
        return f64.silu_slope(beta * v)

    exact = slope(x)
    right = x > x_min
    y_rounded = activations.get("swish", beta=beta).forward(x.float())
    lo = torch.full_like(x, x_min).masked_fill(~right, -1e5)
    hi = torch.full_like(x, x_min).masked_fill(right, 1e5)
    lost = (slope(bisect(f, y_rounded.double(), lo, hi, ~right)) - exact).abs()

    xf = x.float().requires_grad_(True)
    Inverted(a)(xf).backward(torch.ones_like(xf))
    err = (xf.grad.double() - exact).abs()
    far = (beta * (x - x_min)).abs() > 0.05  # in SiLU's coordinate
    floor, floor_far = float(lost.max()), float(lost[far].max())
    # measured: 0.86-1.05x the floor next to the minimum, the floor + 3e-7 away from it
    assert float(err.max()) <= 1.1 * floor + 1e-6, (float(err.max()), floor)
    assert float(err[far].max()) <= floor_far + 5e-7, (float(err[far].max()), floor_far)
    assert torch.equal(Inverted(a)(x.float()), x.float() * torch.sigmoid(beta * x.float())
                       if beta != 1.0 else x.float() * torch.sigmoid(x.float()))
