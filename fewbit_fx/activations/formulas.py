"""Explicit float64 f and f' of the activations with a numerical inverse (no autograd),
stable in both tails: fewbit_fx.inverse tabulates x(y) from them, where the torch op's own
rounding (1 - p cancellation, exp overflow) would spoil the tables."""
from __future__ import annotations

import math

import torch
from torch import Tensor

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K = math.sqrt(2.0 / math.pi)
_C = 0.044715


def sigmoid_pair(a: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmoid(a), sigmoid(-a)) with no 1 - p cancellation and one exp."""
    e = torch.exp(-a.abs())
    r = 1.0 / (1.0 + e)
    pos = a >= 0
    return torch.where(pos, r, e * r), torch.where(pos, e * r, r)


def gelu(x: Tensor) -> Tensor:
    return 0.5 * x * torch.erfc(-x * _SQRT1_2)  # erfc: relative accuracy in the left tail


def gelu_slope(x: Tensor) -> Tensor:
    # erf, not erfc: same absolute accuracy, and Inductor's CPU erfc is 4x slower
    return 0.5 + 0.5 * torch.erf(x * _SQRT1_2) + _INV_SQRT_2PI * x * torch.exp(-0.5 * x * x)


def tanh_gate(x: Tensor) -> tuple[Tensor, Tensor]:
    # 0.5 * (1 + tanh(z)) = sigmoid(2z): no cancellation when x << 0.
    return sigmoid_pair(2.0 * _K * (x + _C * x * x * x))


def gelu_tanh(x: Tensor) -> Tensor:
    return x * tanh_gate(x)[0]


def gelu_tanh_slope(x: Tensor) -> Tensor:
    p, q = tanh_gate(x)
    return p + 2.0 * _K * x * p * q * (1.0 + 3.0 * _C * x * x)


def silu(x: Tensor) -> Tensor:
    return x * sigmoid_pair(x)[0]


def silu_slope(x: Tensor) -> Tensor:
    p, q = sigmoid_pair(x)
    return p * (1.0 + x * q)


def mish_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """tanh(softplus(x)) and its 1 - tanh^2, as rational functions of e = exp(-|x|)."""
    e = torch.exp(-x.abs())
    n = e * (e + 2.0)                   # x <= 0: tanh = n / (n + 2)
    d = 1.0 + 2.0 * e + 2.0 * e * e     # x > 0:  tanh = (1 + 2e) / d
    neg = x <= 0
    t = torch.where(neg, n / (n + 2.0), (1.0 + 2.0 * e) / d)
    sech2 = torch.where(neg, 4.0 * (n + 1.0) / ((n + 2.0) * (n + 2.0)), 4.0 * (e * (1.0 + e) / d) ** 2)
    return t, sech2


def mish(x: Tensor) -> Tensor:
    return x * mish_parts(x)[0]


def mish_slope(x: Tensor) -> Tensor:
    t, sech2 = mish_parts(x)
    return t + x * sech2 * sigmoid_pair(x)[0]


def tanhshrink(x: Tensor) -> Tensor:
    x2 = x * x  # x - tanh(x) cancels for small x: use its series there
    series = x * x2 * (1 / 3 + x2 * (-2 / 15 + x2 * (17 / 315 + x2 * (-62 / 2835))))
    return torch.where(x.abs() < 1e-2, series, x - torch.tanh(x))


def tanhshrink_slope(x: Tensor) -> Tensor:
    return torch.tanh(x) ** 2
