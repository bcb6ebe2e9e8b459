"""In-place activations (module inplace=True, `F.silu(x, inplace=True)`, `x.sigmoid_()`,
`inplace` given by position) in CNN blocks of the kinds torchvision's zoo builds (written
here: torchvision's CUDA build does not import beside the CPU torch).

torch's in-place activation keeps a copy of its input, so it costs what an out-of-place
one does; the analysis must see that, the rewrite must keep the in-place forward (y in x's
storage: code that reads x afterwards reads y), and every site's estimate must be the
saving a step measures.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from _training import grads as _grads
from fewbit_fx.measure import measure_step
from fewbit_fx.nn import FewBit, Inverted


def conv_bn(c_in, c_out, k=1, groups=1):
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


class MBConv(nn.Module):
    """EfficientNet's block: expand, SiLU in place, depthwise, SiLU in place, squeeze-
    excite (global pooling, SiLU, sigmoid gate), project, residual."""

    def __init__(self, c=8, e=4):
        super().__init__()
        h = c * e
        self.expand = nn.Sequential(*conv_bn(c, h), nn.SiLU(inplace=True))
        self.dw = nn.Sequential(*conv_bn(h, h, 3, groups=h), nn.SiLU(inplace=True))
        self.se_reduce, self.se_expand = nn.Conv2d(h, c, 1), nn.Conv2d(c, h, 1)
        self.se_act, self.gate = nn.SiLU(inplace=True), nn.Sigmoid()
        self.project = nn.Sequential(*conv_bn(h, c))

    def forward(self, x):
        h = self.dw(self.expand(x))
        s = F.adaptive_avg_pool2d(h, 1)
        s = self.gate(self.se_expand(self.se_act(self.se_reduce(s))))
        return x + self.project(h * s)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: ReLU6(inplace=True) twice, linear bottleneck. In place, ReLU6
    (a Hardtanh) keeps a copy of its input, out of place its input: either way inverted
    saves it."""

    def __init__(self, c=8, e=4):
        super().__init__()
        h = c * e
        self.body = nn.Sequential(*conv_bn(c, h), nn.ReLU6(inplace=True),
                                  *conv_bn(h, h, 3, groups=h), nn.ReLU6(inplace=True), *conv_bn(h, c))

    def forward(self, x):
        return x + self.body(x)


class Positional(nn.Module):
    """CSP / MobileNetV3-style code: `inplace` by position, functional and method forms."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(c, c, 3, padding=1) for _ in range(4))
        self.c5 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = F.leaky_relu(self.c1(x), 0.01, True)
        h = F.hardtanh(self.c2(h), 0.0, 6.0, True)
        h = F.hardswish(self.c3(h), True)
        h = self.c4(h).sigmoid_()
        h = torch.relu_(self.c5(h))
        return h.sum((2, 3))


class ReadsInputAfter(nn.Module):
    """Relies on the aliasing: the in-place call's result is dropped, x is read."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x):
        h = self.c1(x)
        self.act(h)
        F.silu(h, inplace=True)
        return self.c2(h)


class LaterInPlaceOverwrite(nn.Module):
    """A positional in-place op writes over a GELU's output: inverting it would crash."""

    def __init__(self, c=8):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)

    def forward(self, x):
        y = F.gelu(self.c1(x))
        F.leaky_relu(y, 0.1, True)  # keeps its result: y's storage, at its new version
        return self.c2(y)


class GlobalPoolAfterAct(nn.Module):
    """An activation feeding global pooling (keeps nothing of it) and a Linear: the pool
    does not keep y, so few-bit, not inverted."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(c, 4 * c, 3, padding=1)
        self.act = nn.SiLU(inplace=True)
        self.fc = nn.Linear(4 * c, 10)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.act(self.conv(x)), 1).flatten(1))


BLOCKS = {
    "mbconv": MBConv, "inverted_residual": InvertedResidual, "positional": Positional,
    "reads_input_after": ReadsInputAfter, "later_overwrite": LaterInPlaceOverwrite,
    "global_pool": GlobalPoolAfterAct,
}


def x_in(c=8, n=4, hw=16):
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("mode", ["exact", "auto"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_forward_is_unchanged_and_exact_gradients_agree(name, mode):
    torch.manual_seed(0)
    model, x = BLOCKS[name]().train(), x_in()
    reference = copy.deepcopy(model)
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode=mode)
    assert torch.equal(optimized(x), reference(x))
    for a, b in zip(optimized.buffers(), reference.buffers()):  # BatchNorm statistics
        assert torch.equal(a, b)
    if mode == "exact":
        for got, want in zip(_grads(optimized, x), _grads(reference, x)):
            # SiLU's inverse is exact to its fp32 floor (~5e-5 of f' near its minimum)
            assert float((got - want).norm() / want.norm()) < 1e-4
    else:
        for got in _grads(optimized, x):
            assert got is None or torch.isfinite(got).all()


def test_in_place_sites_are_rewritten_in_place():
    model, x = MBConv(), x_in()
    r = fewbit_fx.report(model, example_inputs=(x,), mode="exact")
    inverted = [row for row in r.rows if row.variant == "inverted"]
    assert {row.site for row in inverted} >= {"expand.2", "dw.2"}
    assert all(row.activation == "silu (in-place)" for row in inverted if row.site in ("expand.2", "dw.2"))
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact")
    for path in ("expand.2", "dw.2"):
        m = optimized.get_submodule(path)
        assert isinstance(m, Inverted) and m.inplace
    # measured: the in-place block saves what the same block with inplace=False saves
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    opt_oop = fewbit_fx.optimize(copy.deepcopy(out_of_place), example_inputs=(x,), mode="exact")
    before = measure_step(copy.deepcopy(model), (x,), {})
    assert before == measure_step(out_of_place, (x,), {})
    after = measure_step(optimized, (x,), {})
    assert after == measure_step(opt_oop, (x,), {}) < 0.8 * before


def test_functional_and_method_in_place_calls_are_rewritten():
    model, x = Positional(), x_in()
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="auto")
    kinds = {type(m).__name__ for m in optimized.modules() if isinstance(m, (FewBit, Inverted))}
    assert kinds, "no site was rewritten"
    assert all(m.inplace for m in optimized.modules() if isinstance(m, (FewBit, Inverted)))
    assert torch.equal(optimized(x), model(x))


def test_a_later_positional_in_place_write_keeps_the_site_from_inverted():
    model, x = LaterInPlaceOverwrite(), x_in()
    r = fewbit_fx.report(model, example_inputs=(x,), mode="exact")
    (row,) = [row for row in r.rows if row.activation == "gelu"]
    assert row.variant == "kept" and "modified in place" in row.reason
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="auto")
    _grads(optimized, x)  # runs: no "modified by an inplace operation"


def test_global_pooling_keeps_nothing_of_its_input():
    model, x = GlobalPoolAfterAct(), x_in()
    r = fewbit_fx.report(model, example_inputs=(x,), mode="auto")
    (row,) = r.rows
    assert row.variant.startswith("fewbit"), row
    assert "no consumer keeps the output" in row.reason


def _site_savings(model, x, mode):
    """Per rewritten site: (estimated bytes saved, measured bytes saved with only that site
    rewritten)."""
    r = fewbit_fx.report(model, example_inputs=(x,), mode=mode)
    before = measure_step(copy.deepcopy(model), (x,), {})
    out = {}
    for row in r.rows:
        if row.variant == "kept":
            continue
        override = "exact" if row.variant == "inverted" else row.variant
        only = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode=mode,
                                  overrides={row.site: override, "*": "keep"})
        out[row.site] = (row.saved_before - row.saved_after, before - measure_step(only, (x,), {}))
    return out


@pytest.mark.parametrize("mode", ["exact", "fewbit"])
@pytest.mark.parametrize("name", ["mbconv", "inverted_residual", "positional", "reads_input_after",
                                  "global_pool"])
def test_every_site_estimate_is_the_measured_saving(name, mode):
    torch.manual_seed(0)
    savings = _site_savings(BLOCKS[name]().train(), x_in(), mode)
    # exact mode cannot save at an output that nothing keeps (the global pool's input)
    if (name, mode) != ("global_pool", "exact"):
        assert savings, "no site was rewritten"
    for site, (estimate, measured) in savings.items():
        assert abs(estimate - measured) <= 0.01 * max(abs(measured), 1), (site, estimate, measured)
