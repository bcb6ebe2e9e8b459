"""Pieces shared by the pass tests: a training step's gradients, and the small MLP around
an activation module that the formula and autograd.Function tests swap."""
from __future__ import annotations

import torch
from torch import nn

D = 16


def grads(model, x):
    """Gradients of the input and every parameter for a fixed, non-uniform upstream
    gradient (a plain .sum() would hide sign errors that cancel)."""
    model.zero_grad(set_to_none=True)
    xr = x.clone().requires_grad_()
    out = model(xr)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return [xr.grad] + [p.grad for p in model.parameters()]


def x_in(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(*(shape or (2, 4, D)), generator=g)).to(dtype).requires_grad_(True)


class MLP(nn.Module):
    def __init__(self, act: nn.Module):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(D, 4 * D)
        self.act = act
        self.fc2 = nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def input_and_fc1_grads(model, x):
    x = x.detach().requires_grad_(True)
    model.zero_grad()
    model(x).square().sum().backward()
    return [x.grad, model.fc1.weight.grad]


def sites_of(model, *args):
    from fewbit_fx.passes import capture, detect

    return detect.find_sites(capture.capture(model, args).graphs)


def assert_exact_gradients_at_the_floor(model, x, floor=5e-5):
    """optimize(mode="exact") against float64 autograd of the user's own module: as close
    as its fp32 run (the original keeps x, so its error is fp32 rounding only) plus the
    inverse's fp32 floor (5e-5 of f' next to a minimum, 2e-7 away from it)."""
    import copy

    import fewbit_fx
    from fewbit_fx.nn import Inverted

    reference = input_and_fc1_grads(copy.deepcopy(model).double(), x.double())
    plain = input_and_fc1_grads(model, x)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    assert isinstance(model.act, Inverted)
    ours = input_and_fc1_grads(model, x)
    for r, p, o in zip(reference, plain, ours):
        scale = float(r.abs().max())
        err, err_plain = float((o.double() - r).abs().max()), float((p.double() - r).abs().max())
        assert err <= err_plain + floor * scale, (err, err_plain, scale)
