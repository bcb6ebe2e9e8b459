"""Activations computed by the user's own torch.autograd.Function (passes/functions): a
module whose forward is one such call is a site when the Function's forward gives a
registry activation bit for bit; it is swapped, the forward stays the same bits, the
gradients are the activation's; near misses and look-alikes stay, with the reason."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from fewbit_fx import activations
from fewbit_fx.measure import measure_step
from fewbit_fx.nn import FewBit, Inverted
from fewbit_fx.passes import capture
from _training import D, MLP, x_in
from _training import assert_exact_gradients_at_the_floor, sites_of as _sites
from _training import input_and_fc1_grads as _grads


def function(forward, derivative, save_output=False):
    """An autograd.Function computing forward(x), its backward grad * derivative(x, y),
    keeping x (as memory-efficient Swish/Mish implementations do) or its output."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            y = forward(x)
            ctx.save_for_backward(y if save_output else x)
            return y

        @staticmethod
        def backward(ctx, grad):
            (saved,) = ctx.saved_tensors
            return grad * derivative(saved)

    return Fn


def _swish_derivative(x):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def _mish_derivative(x):
    t = torch.tanh(F.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


SwishFn = function(lambda x: x * torch.sigmoid(x), _swish_derivative)
MishFn = function(lambda x: x * torch.tanh(F.softplus(x)), _mish_derivative)
SiLUFn = function(F.silu, _swish_derivative)
QuickGeluFn = function(lambda x: x * torch.sigmoid(1.702 * x),
                       lambda x: 1.702 * _swish_derivative(1.702 * x) / 1.702)
SigmoidFn = function(torch.sigmoid, lambda y: y * (1 - y), save_output=True)
# The same SiLU written another way: within 2 ulp of F.silu, not its bits.
SiLUByExpFn = function(lambda x: x / (1 + torch.exp(-x)), _swish_derivative)


class MemoryEfficient(nn.Module):
    """A user's activation module whose forward is one custom Function call."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


# (Function, registry entry, its parameters, report label)
FUNCTIONS = [
    (SwishFn, "swish", {}, "swish(beta=1) (autograd.Function)"),
    (MishFn, "mish_formula", {}, "mish_formula (autograd.Function)"),
    (SiLUFn, "silu", {}, "silu (autograd.Function)"),
    (QuickGeluFn, "quick_gelu", {}, "quick_gelu (autograd.Function)"),
    (SigmoidFn, "sigmoid", {}, "sigmoid (autograd.Function)"),  # keeps its output: kept (fc2 keeps it)
]
IDS = ["swish", "mish", "silu", "quick_gelu", "sigmoid"]
SWAPPED, SWAPPED_IDS = FUNCTIONS[:4], IDS[:4]


@pytest.mark.parametrize("fn, name, params, label", FUNCTIONS, ids=IDS)
def test_a_function_module_is_one_site(fn, name, params, label):
    (site,) = _sites(MLP(MemoryEfficient(fn)), x_in())
    assert site.activation == activations.get(name, **params)
    assert site.module_path == "act" and site.function and site.kind == label
    assert capture.innermost_module(site.input)[0] == "fc1"


@pytest.mark.parametrize("fn, name, params, label", SWAPPED, ids=SWAPPED_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optimized_forward_is_bit_for_bit_the_functions(fn, name, params, label, dtype):
    model = MLP(MemoryEfficient(fn)).to(dtype)
    x = x_in(dtype=dtype)
    expected = model(x)
    for mode in ("exact", "fewbit"):
        m = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode=mode)
        assert isinstance(m.act, Inverted if mode == "exact" else FewBit)
        assert torch.equal(m(x), expected)
        assert torch.equal(m.act(x * 3), fn.apply(x * 3))  # the module alone, wider inputs


@pytest.mark.parametrize("fn, name, params, label", SWAPPED, ids=SWAPPED_IDS)
def test_exact_gradients_are_at_the_floor(fn, name, params, label):
    """Against float64 autograd of the user's Function: as close as its fp32 run, plus the
    inverse's floor (5e-5 of f' next to a minimum)."""
    assert_exact_gradients_at_the_floor(MLP(MemoryEfficient(fn)), x_in())


@pytest.mark.parametrize("fn, label", [(SwishFn, FUNCTIONS[0][3]), (SigmoidFn, FUNCTIONS[4][3])],
                         ids=["keeps x", "keeps its output"])
def test_measured_saving_is_what_the_report_estimated(fn, label):
    """What the Function keeps is read off its forward body: x for Swish (inverted saves
    it), its output for the sigmoid (kept by fc2 too: nothing to save, and the report says so)."""
    model = MLP(MemoryEfficient(fn))
    rep = fewbit_fx.report(model, example_inputs=(x_in(),))
    (row,) = rep.rows
    assert row.activation == label
    estimated = rep.total_before - rep.total_after
    measured = rep.measured_before - rep.measured_after
    assert abs(measured - estimated) <= 0.01 * max(estimated, 1), (measured, estimated)
    before = measure_step(model, (x_in(),), {})
    fewbit_fx.optimize(model, example_inputs=(x_in(),))
    after = measure_step(model, (x_in(),), {})
    assert abs((before - after) - estimated) <= 0.01 * max(estimated, 1)
    if fn is SwishFn:
        assert row.variant == "inverted" and estimated > 0
    else:
        assert row.variant == "kept" and estimated == 0 and "no saving possible" in row.reason, row.reason


def test_a_near_miss_stays_and_the_report_says_why():
    """x / (1 + exp(-x)) is SiLU to within 2 ulp, but not F.silu's bits: swapping it would
    change the forward, so it stays, named with the activation it nearly is."""
    model = MLP(MemoryEfficient(SiLUByExpFn))
    x = x_in()
    assert not _sites(model, x)
    rep = fewbit_fx.report(model, example_inputs=(x,))
    assert any("silu to about 2 ulp but not bit for bit" in n and "MemoryEfficient" in n
               for n in rep.notes), rep.notes
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert type(model.act) is MemoryEfficient and torch.equal(model(x), expected)


class StraightThroughFn(torch.autograd.Function):
    """hardtanh forward, identity backward (a straight-through estimator): not hardtanh."""

    @staticmethod
    def forward(ctx, x):
        return F.hardtanh(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


ReversedSwishFn = function(lambda x: x * torch.sigmoid(x), lambda x: -_swish_derivative(x))
# (a swish whose gradient is reversed, as in domain-adversarial training)


@pytest.mark.parametrize("fn, act", [(StraightThroughFn, "hardtanh(min_val=-1, max_val=1)"),
                                     (ReversedSwishFn, "swish(beta=1)")],
                         ids=["straight-through", "reversed"])
def test_a_function_with_another_backward_stays(fn, act):
    """Its forward is an activation's bits, its backward is not that activation's
    derivative: swapping it would change the gradients, so it stays, with the reason."""
    model, x = MLP(MemoryEfficient(fn)), x_in()
    assert not _sites(model, x)
    rep = fewbit_fx.report(model, example_inputs=(x,))
    assert any(f"{act} bit for bit, but its backward is not {act}'s derivative" in n for n in rep.notes), rep.notes
    want = _grads(model, x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert type(model.act) is MemoryEfficient
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, x), want))


class ScaledFn(torch.autograd.Function):
    """x * sigmoid(beta * x) with beta a tensor: two inputs, not an activation of x."""

    @staticmethod
    def forward(ctx, x, beta):
        ctx.save_for_backward(x, beta)
        return x * torch.sigmoid(beta * x)

    @staticmethod
    def backward(ctx, grad):
        x, beta = ctx.saved_tensors
        s = torch.sigmoid(beta * x)
        return grad * (s + beta * x * s * (1 - s)), (grad * x * x * s * (1 - s)).sum()


class LearnedSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return ScaledFn.apply(x, self.beta)


class Outer(nn.Module):
    """The Function called inside a bigger forward: no module of its own to swap."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(SwishFn.apply(x) + 1)


@pytest.mark.parametrize("model", [MLP(LearnedSwish()), Outer()], ids=["learned beta", "inline call"])
def test_look_alikes_stay_as_they_are(model):
    x = x_in()
    assert not _sites(model, x)
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert torch.equal(model(x), expected)
    assert not any(isinstance(m, (FewBit, Inverted)) for m in model.modules())


class Stateful(MemoryEfficient):
    """An activation module with a buffer of its own: swapping it would drop the buffer
    from the state dict."""

    def __init__(self, fn):
        super().__init__(fn)
        self.register_buffer("calls", torch.zeros(()))


def test_a_module_with_state_is_not_swapped():
    model, x = MLP(Stateful(SwishFn)), x_in()
    keys = set(model.state_dict())
    rep = fewbit_fx.report(model, example_inputs=(x,))
    (row,) = rep.rows
    assert row.variant == "kept" and "buffer" in row.reason, row.reason
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert type(model.act) is Stateful and set(model.state_dict()) == keys


def test_under_the_fewbit_backend():
    """The compiler backend finds the same site in Dynamo's graph: fewer saved bytes than
    torch.compile's default, the same forward, gradients within the inverse's floor."""
    torch._dynamo.reset()  # MLP.forward was compiled by the tests above, up to Dynamo's limit
    model, x = MLP(MemoryEfficient(SwishFn)), x_in(64, D)
    backend = fewbit_fx.backend()
    default = torch.compile(copy.deepcopy(model))
    ours = torch.compile(copy.deepcopy(model), backend=backend)
    assert torch.equal(ours(x), default(x))
    (site,) = [p for plan in backend.plans for p in plan]
    assert site.site.kind == FUNCTIONS[0][3] and site.decision.variant == "inverted"
    assert measure_step(ours, (x,), {}) < measure_step(default, (x,), {})
    want = torch.autograd.grad(default(x).square().sum(), x)[0]
    got = torch.autograd.grad(ours(x).square().sum(), x)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_bloom_gelu_function_is_found():
    """Bloom's MLP runs its tanh GELU through a custom autograd.Function in training
    (transformers' GeLUFunction, backward written out): found, swapped, forward unchanged,
    the measured saving what the report estimated, gradients as the original's."""
    pytest.importorskip("transformers")
    from fewbit_fx.evidence.models import build_hf

    model, args, kwargs = build_hf("bloom", "tiny")
    rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode="exact")
    assert rep.rows and all(r.activation.endswith("(autograd.Function)") and r.variant == "inverted"
                            for r in rep.rows), str(rep)
    estimated = rep.total_before - rep.total_after
    measured = rep.measured_before - rep.measured_after
    assert estimated > 0 and abs(measured - estimated) <= 0.01 * estimated, (measured, estimated)

    def step(m):
        m.zero_grad(set_to_none=True)
        out = m(*args, **kwargs).last_hidden_state
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    want_out, want_grads = step(model)
    fewbit_fx.optimize(model, example_inputs=args, example_kwargs=kwargs, mode="exact")
    assert sum(isinstance(m, Inverted) for m in model.modules()) == len(rep.rows)
    got_out, got_grads = step(model)
    assert torch.equal(got_out, want_out)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4 * float(w.abs().max()) + 1e-7)
