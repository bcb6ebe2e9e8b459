"""Float32 forwards of GELU (both forms) and Mish for the compiled path
(inverted.compiled_output): rounded as the numerical inverse needs them at the minimum, in
one fused Inductor kernel, without float64.

Near the minimum x_min, f' ~ sqrt(2 f'' (y - y_min)), so an error of k/2 ulps in y costs
~sqrt(k) times the inverse's floor there, and Inductor's float32 y is up to 8.8 ulps off
(erf GELU: its vectorised erf has ~1.5e-7 absolute error, and 1 + erf cancels), 2.5 (tanh
GELU) or 1.9 (Mish). On |x - x_min| < 1/8 the forwards here compute instead

    y = y0 + P(h),   h = x - x0,

with x0 = x_min and y0 = y_min rounded to float32 (h is exact there, Sterbenz) and P of
degree 5, fitted on import to the float64 formulas of fewbit_fx.activations.formulas
(Chebyshev interpolation; 0.01-0.03 ulp). |P| < 0.004 there, so its float32 rounding costs
< 0.05 ulp and y is within 0.55 ulp (measured max on a dense sweep of the window: 0.544
erf GELU, 0.541 tanh GELU, 0.516 Mish).

Outside the window:
* erf GELU and Mish keep the forward as Inductor compiles it (torch's op, or the user's
  formula for the twins), bit for bit.
* tanh GELU is x sigmoid(2z), z = k (x + c x^3), as E = exp(-|2z|), s = E / (1 + E): no
  1 + tanh cancellation, and 2z as an exact float32 pair (tanh_argument), so the left tail
  keeps its relative precision: within 3.9 ulps on [-8, 8] and 10.8 on [-14, -8] (Inductor's
  0.5 x (1 + tanh z): 203 ulps on [-3, 0], 1.75 on [0, 8], and y flushed to 0 below
  x ~ -5). It is cheaper than Inductor's tanh GELU even so (Sleef's tanh costs more than
  the exp and the pair).

Measured (torch 2.13 CPU, AVX2, 2 shared cores). Compiled f' error against the floor
(tests/ops/test_compiled_inverse.py, fp32): gelu 3.05e-4 -> 4.62e-5 (floor 4.76e-5),
gelu_tanh 1.43e-4 -> 4.77e-5 (floor 5.14e-5), mish 1.44e-4 -> 6.91e-5 (floor 6.92e-5); the
formula twins the same. Cost of the forward kernel against Inductor's own, 4M fp32 elements,
1 thread, interleaved, median of 21: erf GELU 1.23-1.29x (the window's ~15 vector ops on
top of ~40), tanh GELU 0.81-0.84x, Mish 1.04x; the float64 forward (FLOAT64_FORWARD):
5.9-6.9x, 2.0x, 1.7x.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from fewbit_fx.activations import Activation
from fewbit_fx.activations.formulas import _C as _TANH_C, _K as _TANH_K
from fewbit_fx.inverse import _FORMULAS, _INVERSES

HALF_WIDTH = 0.125  # |x - x_min| below which y = y0 + P(h)
DEGREE = 5


class Minimum(NamedTuple):
    x0: float                  # x_min rounded to float32
    y0: float                  # y_min rounded to float32
    half_width: float
    coefficients: tuple[float, ...]  # float32 values, highest power first: P(h) ~ f(x0 + h) - y0


def fit_minimum(name: str, half_width: float = HALF_WIDTH, degree: int = DEGREE) -> Minimum:
    """P interpolating f(x0 + h) - y0 (float64) at degree + 1 Chebyshev points of
    [-half_width, half_width], coefficients rounded to float32."""
    inv, f = _INVERSES[name], _FORMULAS[name].f
    x0 = float(torch.tensor(inv.x_min, dtype=torch.float32))
    y0 = inv.y_min_hi32
    k = torch.arange(degree + 1, dtype=torch.float64)
    s = torch.cos(math.pi * (k + 0.5) / (degree + 1))
    values = f(x0 + half_width * s) - y0
    in_s = torch.linalg.solve(s[:, None] ** k, values)  # well conditioned on [-1, 1]
    coefficients = (in_s / half_width**k).float().double()
    return Minimum(x0, y0, half_width, tuple(coefficients.flip(0).tolist()))


MINIMA: dict[str, Minimum] = {name: fit_minimum(name) for name in ("gelu", "gelu_tanh", "mish")}


def at_minimum(x: Tensor, y: Tensor, m: Minimum) -> Tensor:
    """y, with y0 + P(x - x0) where |x - x0| < half_width."""
    h = x - m.x0
    c = m.coefficients
    p = c[0] * h + c[1]
    for ck in c[2:]:
        p = p * h + ck
    return torch.where(h.abs() < m.half_width, p + m.y0, y)


def _round_bits(v: float, bits: int) -> float:
    """v rounded to `bits` significant bits."""
    e = math.frexp(v)[1]
    return math.ldexp(round(math.ldexp(v, bits - e)), e - bits)


def _f32(v: float) -> float:
    """v rounded to float32 (normal range), in plain Python: Dynamo folds it when it traces
    compiled_output (the in-place variant), where a tensor's float() would break the graph."""
    return _round_bits(v, 24)


def _two_sum(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """(s, e) with s = fl(a + b) and a + b = s + e exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def tanh_argument(x: Tensor, k: float = _TANH_K, c: float = _TANH_C) -> tuple[Tensor, Tensor]:
    """(z1, z2): 2 k (x + c x^3) = A x + B x^3 (twice tanh's argument) as an unevaluated
    float32 pair z1 + z2, to 2e-7 absolute on |x| <= 12 (4e-8 on |x| <= 5, measured), where
    the plain float32 evaluation is off by up to ~4 ulps of it (2.7e-5 at 87, the end of
    exp's range, so ~200 ulps of exp). x = xh + xl with xh on a 1/16 grid (8
    bits), so xh^2, xh^3 and A_hi xh (A to 16 bits) are exact; B xh^3 is Dekker's exact
    product (xh^3 split at 4097, B in 12-bit halves); the rest (xl terms, the constants'
    tails) is small. No FMA: Inductor's CPU kernels compile without contraction and never
    reassociate, so these error-free steps stay exact."""
    a, b = 2.0 * k, 2.0 * k * c
    a32, a_hi = _f32(a), _round_bits(a, 16)
    a_lo = _f32(a - a_hi)
    b32 = _f32(b)
    b_hi = _round_bits(b32, 12)
    b_lo, b_tail = b32 - b_hi, _f32(b - b32)
    x = x.clamp(-12.0, 12.0)  # |z| > 140 past it: exp(-|z|) = 0 either way
    xh = torch.round(x * 16.0) * 0.0625
    xl = x - xh
    xh2 = xh * xh
    xh3 = xh2 * xh
    g = xh3 * 4097.0
    xh3_hi = g - (g - xh3)
    xh3_lo = xh3 - xh3_hi
    p1 = xh3 * b32
    e1 = ((xh3_hi * b_hi - p1) + xh3_lo * b_hi + xh3_hi * b_lo) + xh3_lo * b_lo
    zh, e2 = _two_sum(xh * a_hi, p1)
    cube_rest = xl * ((x * x + x * xh) + xh2)  # x^3 - xh^3
    small = ((xl * a32 + xh * a_lo) + cube_rest * b32) + xh3 * b_tail
    return _two_sum(zh, (e2 + e1) + small)


def gelu_tanh(x: Tensor, k: float = _TANH_K, c: float = _TANH_C) -> Tensor:
    """x * sigmoid(2z) = 0.5 x (1 + tanh z), z = k (x + c x^3): exp(-|2z|) from the exact
    pair (tanh_argument), s = E / (1 + E) = sigmoid(-|2z|), y = x s or x (1 - s)."""
    z1, z2 = tanh_argument(x, k, c)
    e = torch.exp(-z1.abs()) * (1.0 + torch.where(x < 0, z2, -z2))  # exp(-|z1 + z2|)
    s = e / (1.0 + e)
    return x * torch.where(x < 0, s, 1.0 - s)


def output(a: Activation, base: str, x: Tensor) -> Tensor:
    """The float32 forward of a (base: its registry name, or its twin's: "gelu", "mish" or
    "gelu_tanh"). The tanh spellings with their own k, c keep them outside the window; in
    it P is GELU's (and the inverse is too): their k moves y there by 0.16 |dk / k|, < 0.1
    ulp for 0.79788456 and 0.7978845608, ~1 ulp at the registry check's 1e-7."""
    if base != "gelu_tanh":  # Inductor's forward, but at the minimum
        return at_minimum(x, a.forward(x), MINIMA[base])
    p = a.p
    return at_minimum(x, gelu_tanh(x, p.get("k", _TANH_K), p.get("c", _TANH_C)), MINIMA[base])
