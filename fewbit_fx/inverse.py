"""f'(x) from the output y = f(x) for activations with no closed-form inverse.

Inverted activations (Novikov & Oseledets 2024) save y instead of x; backward needs f'(x).
For gelu, gelu_tanh, silu, mish and tanhshrink, x is recovered numerically. Non-monotone
ones also get the 1-bit branch mask right = (x > x_min).

Method. x and f'(x) are tabulated once, in float64, as functions of a coordinate c in
which they are smooth on the whole branch, then read back as piecewise polynomials in c
(x: quartics on intervals of 1/16; f': quadratics on intervals of 1/64, see _X_GRID and
_SLOPE_GRID):

* right branch:  c = sqrt((y - y_min) / |y_min|)   (x is analytic in c at the minimum;
  past the table's end x = y to float64 precision)
* left branch:   c = sqrt(-log(y / y_min))          (the same sqrt behaviour at the minimum
  and still well spread in the tail where y -> 0-, down to |y| = 1e-38)
* tanhshrink:    c = (3|y|)^(1/3)                   (y ~ x^3/3 at the inflection; odd)

The x table is accurate to ~5e-10 and the f' table to ~1e-7, below float32 resolution. Float32 (and half, which
computes in float32) reads f' straight from its table: no x, no erf/exp, and no Newton
step, which would only add its own rounding noise (the residual f(x) - y cancels to ~1e-8,
and near the minimum that is divided by f' ~ 0). y - y_min is computed exactly (y_min
split into hi + lo, Sterbenz), so float32 reaches the rounding floor of y. Float64 reads
x, takes one Newton step wherever |f'| > 1e-3, and evaluates f'(x): near float64's floor.

Everything is plain aten ops with no data-dependent Python control flow: torch.compile
fuses it into one kernel (the table is a small constant tensor read by indexing).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from fewbit_fx.activations import Activation, get

_SQRT1_2 = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K = math.sqrt(2.0 / math.pi)
_C = 0.044715

class _Grid(NamedTuple):
    step: float   # interval width in c
    degree: int   # polynomial degree per interval


_X_GRID = _Grid(1.0 / 16.0, 4)      # float64 x (then a Newton step): ~5e-10
_SLOPE_GRID = _Grid(1.0 / 64.0, 2)  # float32 f': ~1e-7, 3 indexed loads per element
_TINY = 1e-38           # left branch: |y| below this reads as this (f' < 1e-36 there)
_X_CAP = 1e4            # |x| cap: keeps inf inputs finite; f' is flat long before it


# --- explicit f and f' (no autograd), stable in both tails ---------------------------------
def _sigmoid_pair(a: Tensor) -> tuple[Tensor, Tensor]:
    """(sigmoid(a), sigmoid(-a)) with no 1 - p cancellation and one exp."""
    e = torch.exp(-a.abs())
    r = 1.0 / (1.0 + e)
    pos = a >= 0
    return torch.where(pos, r, e * r), torch.where(pos, e * r, r)


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * torch.erfc(-x * _SQRT1_2)  # erfc: relative accuracy in the left tail


def _gelu_slope(x: Tensor) -> Tensor:
    # erf, not erfc: same absolute accuracy, and Inductor's CPU erfc is 4x slower
    return 0.5 + 0.5 * torch.erf(x * _SQRT1_2) + _INV_SQRT_2PI * x * torch.exp(-0.5 * x * x)


def _tanh_gate(x: Tensor) -> tuple[Tensor, Tensor]:
    # 0.5 * (1 + tanh(z)) = sigmoid(2z): no cancellation when x << 0.
    return _sigmoid_pair(2.0 * _K * (x + _C * x * x * x))


def _gelu_tanh(x: Tensor) -> Tensor:
    return x * _tanh_gate(x)[0]


def _gelu_tanh_slope(x: Tensor) -> Tensor:
    p, q = _tanh_gate(x)
    return p + 2.0 * _K * x * p * q * (1.0 + 3.0 * _C * x * x)


def _silu(x: Tensor) -> Tensor:
    return x * _sigmoid_pair(x)[0]


def _silu_slope(x: Tensor) -> Tensor:
    p, q = _sigmoid_pair(x)
    return p * (1.0 + x * q)


def _mish_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    """tanh(softplus(x)) and its 1 - tanh^2, as rational functions of e = exp(-|x|)."""
    e = torch.exp(-x.abs())
    n = e * (e + 2.0)                   # x <= 0: tanh = n / (n + 2)
    d = 1.0 + 2.0 * e + 2.0 * e * e     # x > 0:  tanh = (1 + 2e) / d
    neg = x <= 0
    t = torch.where(neg, n / (n + 2.0), (1.0 + 2.0 * e) / d)
    sech2 = torch.where(neg, 4.0 * (n + 1.0) / ((n + 2.0) * (n + 2.0)), 4.0 * (e * (1.0 + e) / d) ** 2)
    return t, sech2


def _mish(x: Tensor) -> Tensor:
    return x * _mish_parts(x)[0]


def _mish_slope(x: Tensor) -> Tensor:
    t, sech2 = _mish_parts(x)
    return t + x * sech2 * _sigmoid_pair(x)[0]


def _tanhshrink(x: Tensor) -> Tensor:
    x2 = x * x  # x - tanh(x) cancels for small x: use its series there
    series = x * x2 * (1 / 3 + x2 * (-2 / 15 + x2 * (17 / 315 + x2 * (-62 / 2835))))
    return torch.where(x.abs() < 1e-2, series, x - torch.tanh(x))


def _tanhshrink_slope(x: Tensor) -> Tensor:
    return torch.tanh(x) ** 2


class _Formulas(NamedTuple):
    f: Callable[[Tensor], Tensor]
    slope: Callable[[Tensor], Tensor]
    x_end: float  # past it f(x) = x (+ const) and f'(x) = 1 to float64 precision


_FORMULAS: dict[str, _Formulas] = {
    "gelu": _Formulas(_gelu, _gelu_slope, 8.5),
    "gelu_tanh": _Formulas(_gelu_tanh, _gelu_tanh_slope, 8.0),
    "silu": _Formulas(_silu, _silu_slope, 40.0),
    "mish": _Formulas(_mish, _mish_slope, 20.0),
    "tanhshrink": _Formulas(_tanhshrink, _tanhshrink_slope, 20.0),
}
SUPPORTED: tuple[str, ...] = tuple(_FORMULAS)


def value_and_derivative(act: Activation, x: Tensor) -> tuple[Tensor, Tensor]:
    """(f(x), f'(x)) from explicit formulas, in x's dtype."""
    fm = _FORMULAS[act.name]
    return fm.f(x), fm.slope(x)


# --- tables -------------------------------------------------------------------------------
_SIGN = -(1 << 63)


def _key(x: Tensor) -> Tensor:
    """float64 -> int64 with the same order, so bisection can split the bit patterns."""
    b = x.view(torch.int64)
    return torch.where(b >= 0, b, -(b & ~_SIGN))


def _unkey(k: Tensor) -> Tensor:
    return torch.where(k >= 0, k, (-k) | _SIGN).view(torch.float64)


def bisect(f: Callable[[Tensor], Tensor], y: Tensor, lo: Tensor, hi: Tensor, decreasing: Tensor) -> Tensor:
    """x in [lo, hi] with f(x) = y for f monotone there, to the last float64 bit.

    Slow and robust (66 halvings of the bit pattern); the reference and the table builder.
    """
    y = y.double()
    klo, khi = _key(lo.double().expand_as(y)), _key(hi.double().expand_as(y))
    for _ in range(66):
        mid = (klo >> 1) + (khi >> 1) + (klo & khi & 1)
        fm = f(_unkey(mid))
        below = torch.where(decreasing, fm > y, fm < y)
        klo, khi = torch.where(below, mid, klo), torch.where(below, khi, mid)
    return _unkey(khi)


def _horner(columns: tuple[Tensor, ...], c: Tensor, first, grid: _Grid) -> Tensor:
    """The piecewise polynomial at c >= 0 in the table part starting at row `first`."""
    t = c * (1.0 / grid.step)
    i = torch.floor(t)
    s = t - i
    # The clamp only matters for NaN y (its index is garbage; the result comes out NaN).
    row = torch.clamp(i.int() + first, 0, len(columns[0]) - 1)
    v = columns[grid.degree][row]
    for k in range(grid.degree - 1, -1, -1):
        v = v * s + columns[k][row]
    return v


@dataclass(frozen=True)
class _Inverse:
    """Per-activation constants and the float64 coefficient tables (left rows, then right)."""

    x_min: float | None
    y_min: float
    y_min_hi32: float  # y_min rounded to float32: y - hi is exact near y_min (Sterbenz)
    c_left: float      # table end of the left coordinate
    c_right: float     # table end of the right (or tanhshrink) coordinate
    x_table: Tensor    # (rows, degree + 1): x = sum_k row[k] s^k, c = (row + s) * step
    slope_table: Tensor  # the same for f'(x), on its own grid
    x_left_rows: int
    slope_left_rows: int


def _fit(values_of_c: Callable[[Tensor], Tensor], c_end: float, grid: _Grid) -> Tensor:
    """A polynomial per interval, interpolating at the interval's Chebyshev points. One
    extra constant row, the value at c_end, serves c = c_end should it round onto a row
    edge (and every c past the end, which is clamped to it)."""
    n = math.ceil(c_end / grid.step)
    k = torch.arange(grid.degree + 1, dtype=torch.float64)
    s = 0.5 - 0.5 * torch.cos(math.pi * (k + 0.5) / (grid.degree + 1))
    c = (torch.arange(n, dtype=torch.float64)[:, None] + s) * grid.step
    v = values_of_c(torch.cat([c.flatten(), torch.tensor([c_end], dtype=torch.float64)]))
    rows = torch.linalg.solve(s[:, None] ** k, v[:-1].view(n, grid.degree + 1).T).T
    end = torch.zeros(1, grid.degree + 1, dtype=torch.float64)
    end[0, 0] = v[-1]
    return torch.cat([rows, end])


def _fit_branch(x_of_c: Callable[[Tensor], Tensor], slope, c_end: float) -> tuple[Tensor, Tensor]:
    """(x table, f' table): x by bisection, f' of the x table's values (accurate to ~5e-10,
    and ~30x fewer bisections than sampling f' on its finer grid)."""
    x_table = _fit(x_of_c, c_end, _X_GRID)
    columns = tuple(x_table.T)
    return x_table, _fit(lambda c: slope(_horner(columns, c, 0, _X_GRID)), c_end, _SLOPE_GRID)


def _build(name: str) -> _Inverse:
    f, slope, x_end = _FORMULAS[name]
    one = torch.ones((), dtype=torch.float64)
    if get(name).monotone:  # tanhshrink: odd, increasing; c = (3y)^(1/3) on y >= 0
        c_right = (3.0 * f(x_end * one).item()) ** (1 / 3)
        xt, st = _fit_branch(lambda c: bisect(f, c**3 / 3, 0 * one, 2 * x_end * one, one < 0), slope, c_right)
        return _Inverse(None, 0.0, 0.0, 0.0, c_right, xt, st, 0, 0)
    # The minimum to the last bit (f' = 0), tighter than the registry's ~1e-9 x_min.
    x_min = bisect(slope, 0 * one, -6 * one, 0 * one, one < 0).item()
    y_min = f(x_min * one).item()
    c_right = math.sqrt((f(x_end * one).item() - y_min) / -y_min)
    c_left = math.sqrt(math.log(y_min / -_TINY))
    right = _fit_branch(lambda c: bisect(f, y_min - y_min * c * c, x_min * one, 2 * x_end * one, one < 0),
                        slope, c_right)
    left = _fit_branch(lambda c: bisect(f, y_min * torch.exp(-c * c), -1e4 * one, x_min * one, one > 0),
                       slope, c_left)
    y_min_hi32 = torch.tensor(y_min, dtype=torch.float32).item()
    return _Inverse(x_min, y_min, y_min_hi32, c_left, c_right,
                    torch.cat([left[0], right[0]]), torch.cat([left[1], right[1]]),
                    len(left[0]), len(left[1]))


# Built at import (~0.1 s for all five) so that tracing only ever reads them.
_INVERSES: dict[str, _Inverse] = {name: _build(name) for name in SUPPORTED}
_COLUMNS: dict[tuple[str, str], list[list[float]]] = {
    (name, kind): getattr(inv, kind).T.tolist()
    for name, inv in _INVERSES.items() for kind in ("x_table", "slope_table")
}
_CACHED: dict[tuple[str, str, torch.dtype], tuple[Tensor, ...]] = {
    (name, kind, dt): tuple(torch.tensor(col, dtype=dt) for col in cols)
    for (name, kind), cols in _COLUMNS.items() for dt in (torch.float32, torch.float64)
}


def _table(name: str, kind: str, dtype: torch.dtype, y: Tensor) -> tuple[Tensor, ...]:
    """The coefficient table, one tensor per power of s (a column gathers faster than a
    row under Inductor), as the current tracer can use it.

    Eager and Dynamo take the cached tensors (Dynamo lifts them as constants; their values
    would cost ~1e3 guards). Under fake or functional tensors (a custom op's fake, make_fx,
    AOT dispatch) a real tensor may not mix in, so the table is made afresh there.
    """
    if torch.compiler.is_dynamo_compiling() or (
        type(y) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0
    ):
        return tuple(t.to(y.device) for t in _CACHED[name, kind, dtype])
    return tuple(torch.tensor(col, dtype=dtype, device=y.device) for col in _COLUMNS[name, kind])


# --- the fast path --------------------------------------------------------------------------
def derivative_from_output(
    act: Activation, y: Tensor, right: Tensor | None, dtype: torch.dtype | None = None
) -> Tensor:
    """f'(x) where f(x) = y, on the branch right = (x > x_min) for non-monotone f.

    right is None for monotone tanhshrink. Computes in float32 (float64 for float64 y) and
    returns `dtype`, by default y's; float32 for half y skips rounding f' to half (which
    costs up to half an ulp of 1, more than the floor for tanhshrink). y below y_min reads
    as y_min; y = 0 on the left branch as x -> -inf.
    """
    if act.name not in _INVERSES:
        raise TypeError(f"no numerical inverse for {act}; supported: {', '.join(SUPPORTED)}")
    inv = _INVERSES[act.name]
    if inv.x_min is not None and right is None:
        raise ValueError(f"{act} is not monotone: pass right = (x > x_min)")
    wide = y.dtype == torch.float64
    dt = torch.float64 if wide else torch.float32
    yc = y.to(dt)
    c, tail = _coordinate(inv, yc, right, dt)
    out_dtype = y.dtype if dtype is None else dtype
    if not wide:  # f' straight from its table; past the right end f' = 1
        first = 0 if right is None else torch.where(right, inv.slope_left_rows, 0)
        d = _horner(_table(act.name, "slope_table", dt, y), c, first, _SLOPE_GRID)
        return torch.where(tail, 1.0, d).to(out_dtype)

    fm = _FORMULAS[act.name]
    if inv.x_min is None:  # tanhshrink: x >= 0 solves f(x) = |y|; past the end f(x) = x - 1
        yc = yc.abs()
    first = 0 if right is None else torch.where(right, inv.x_left_rows, 0)
    x = _horner(_table(act.name, "x_table", dt, y), c, first, _X_GRID)
    x = torch.where(tail, yc + (1.0 if inv.x_min is None else 0.0), x)
    x = _clamp_branch(x, right, inv.x_min)
    slope = fm.slope(x)  # one Newton step where f' is not ~0 (the table: ~5e-10)
    step = torch.where(slope.abs() > 1e-3, (fm.f(x) - yc) / slope, torch.zeros_like(x))
    return fm.slope(_clamp_branch(x - step, right, inv.x_min)).to(out_dtype)


def _coordinate(inv: _Inverse, yc: Tensor, right: Tensor | None, dt: torch.dtype):
    """(c, past the right table end) for each y."""
    if inv.x_min is None:  # tanhshrink: f odd, f' even, so solve f(x) = |y| for x >= 0
        a = 3.0 * yc.abs()
        return torch.clamp(a, max=inv.c_right**3) ** (1.0 / 3.0), a >= inv.c_right**3
    y_hi = inv.y_min if dt == torch.float64 else inv.y_min_hi32
    scale = -1.0 / inv.y_min
    r = torch.clamp(((yc - y_hi) - (inv.y_min - y_hi)) * scale, min=0.0)  # (y - y_min) / |y_min|
    # -log(y / y_min) = -log1p(-r): r exact near the minimum; in the tail y / y_min - 1
    # keeps y's relative precision down to where f' is far below any rounding.
    q = torch.clamp(yc * -scale, min=_TINY / -inv.y_min, max=1.0)
    ell = -torch.log1p(torch.where(r < 0.5, -r, q - 1.0))
    u = torch.where(right, torch.clamp(r, max=inv.c_right**2), torch.clamp(ell, min=0.0, max=inv.c_left**2))
    return torch.sqrt(u), right & (r >= inv.c_right**2)


def _clamp_branch(x: Tensor, right: Tensor | None, x_min: float | None) -> Tensor:
    """Keep x on its branch (and finite: y = inf must not give inf * 0)."""
    if x_min is None:
        return torch.clamp(x, 0.0, _X_CAP)
    return torch.where(right, torch.clamp(x, x_min, _X_CAP), torch.clamp(x, -_X_CAP, x_min))


# --- tanhshrink in half precision -------------------------------------------------------
def tanhshrink_half_derivative(y: Tensor, rounded_tanh: bool = True) -> Tensor:
    """f'(x) in float32 for half y = tanhshrink(x), read by y's 16-bit pattern.

    A half x takes one of 2^16 values, so each y has a known, finite set of preimages,
    and the table holds the middle of f' over them: the smallest worst-case error any
    method given y can reach. Which set depends on the forward that ran: eager torch
    computes x - tanh(x) with tanh(x) rounded to the dtype first (rounded_tanh; then y = 0
    for every |x| < 0.09 in bf16, which the smooth inverse misreads by up to 0.008),
    Inductor in fp32 with one rounding at the end.
    """
    values = _tanhshrink_half_table(y.dtype, rounded_tanh)
    if torch.compiler.is_dynamo_compiling() or (
        type(y) is torch.Tensor and torch._C._len_torch_dispatch_stack() == 0
    ):
        table = _tanhshrink_half_tensor(y.dtype, rounded_tanh).to(y.device)
    else:  # under fake or functional tensors a real tensor may not mix in (see _table)
        table = torch.tensor(values, dtype=torch.float32, device=y.device)
    return table[y.view(torch.int16).to(torch.int32) & 0xFFFF]


@functools.lru_cache(maxsize=None)
def _tanhshrink_half_tensor(dtype: torch.dtype, rounded_tanh: bool) -> Tensor:
    return torch.tensor(_tanhshrink_half_table(dtype, rounded_tanh), dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def _tanhshrink_half_table(dtype: torch.dtype, rounded_tanh: bool) -> tuple[float, ...]:
    """The 2^16 entries of tanhshrink_half_derivative's table (built once, ~10 ms)."""
    from fewbit_fx.activations import real_tensors

    with real_tensors():
        y_of_pattern = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
        x = y_of_pattern[~torch.isnan(y_of_pattern)]  # every half input but NaN
        if rounded_tanh:
            y = x - torch.tanh(x)  # rounds tanh(x) to the dtype, as torch's eager op
        else:
            y = (x.float() - torch.tanh(x.float())).to(dtype)
        slope = torch.tanh(x.double()) ** 2
        key = y.view(torch.int16).to(torch.int64) & 0xFFFF
        lo = torch.full((1 << 16,), math.inf, dtype=torch.float64).scatter_reduce(0, key, slope, "amin")
        hi = torch.full((1 << 16,), -math.inf, dtype=torch.float64).scatter_reduce(0, key, slope, "amax")
        # y no half x gives (a forward rounding otherwise): the smooth inverse; NaN stays NaN.
        smooth = derivative_from_output(get("tanhshrink"), y_of_pattern.double(), None)
        table = torch.where(lo <= hi, 0.5 * (lo + hi), smooth)
        return tuple(table.float().tolist())


# --- measurement -----------------------------------------------------------------------------
def floor_and_error(
    act: Activation, dtype: torch.dtype, n: int = 2_000_000, seed: int = 0,
    out_dtype: torch.dtype | None = None,
) -> dict:
    """Max |f'| error of derivative_from_output against the rounding floor of dtype.

    x: n samples of N(0, 2^2), dense sweeps around x_min (0 for tanhshrink) and log-spaced
    tails, all rounded to dtype. y = f(x) in float64 rounded to dtype; x* = exact float64
    inverse of that y on x's branch (bisection). floor = max |f'(x*) - f'(x)|: what any
    method given only the rounded y must lose. error = max |ours(y) - f'(x)|; error_far
    the same where |x - x_min| > 0.05. out_dtype is passed on as derivative_from_output's
    dtype (default: dtype, whose rounding of f' then counts in the error).
    """
    x, y, right, exact, floor = _reference(act.name, dtype, n, seed)
    err = (derivative_from_output(act, y, right, out_dtype).double() - exact).abs()
    far = (x - (_INVERSES[act.name].x_min or 0.0)).abs() > 0.05
    return dict(floor=floor, error=err.max().item(), error_far=err[far].max().item())


@functools.lru_cache(maxsize=2)
def _reference(name: str, dtype: torch.dtype, n: int, seed: int):
    """Samples, rounded y, branch, exact f'(x) and the floor (the slow bisection part)."""
    f, slope, _ = _FORMULAS[name]
    x_min = _INVERSES[name].x_min
    center = x_min if x_min is not None else 0.0
    gen = torch.Generator().manual_seed(seed)
    m = max(n // 20, 1000)
    tail = torch.logspace(-3, 2, m, dtype=torch.float64)
    parts = [2.0 * torch.randn(n, generator=gen, dtype=torch.float64), tail, -tail,
             torch.tensor([1e3, -1e3, 6e4, -6e4], dtype=torch.float64)]
    parts += [center + torch.linspace(-w, w, m, dtype=torch.float64) for w in (1e-4, 1e-3, 1e-2, 0.1)]
    x = torch.cat(parts).to(dtype).double()
    y = f(x).to(dtype)
    if x_min is None:
        right = None
        lo, hi = torch.full_like(x, -1e5), torch.full_like(x, 1e5)
        decreasing = torch.zeros_like(x, dtype=torch.bool)
    else:
        right = x > x_min
        lo = torch.full_like(x, x_min).masked_fill(~right, -1e5)
        hi = torch.full_like(x, x_min).masked_fill(right, 1e5)
        decreasing = ~right
    exact = slope(x)
    x_star = bisect(f, y.double(), lo, hi, decreasing)
    return x, y, right, exact, (slope(x_star) - exact).abs().max().item()


__all__ = ["SUPPORTED", "bisect", "derivative_from_output", "floor_and_error", "tanhshrink_half_derivative",
           "value_and_derivative"]
