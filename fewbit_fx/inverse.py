"""f'(x) from the output y = f(x) for activations with no closed-form inverse.

Inverted activations (Novikov & Oseledets 2024) save y instead of x; backward needs f'(x).
For the registry entries with a `Numerical` inverse (gelu, gelu_tanh, silu, mish and
tanhshrink), x is recovered numerically from their explicit f and f'. Non-monotone ones
also get the 1-bit branch mask right = (x > x_min).

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

from fewbit_fx.activations import SPECS, Activation, Numerical, get


class _Grid(NamedTuple):
    step: float   # interval width in c
    degree: int   # polynomial degree per interval


_X_GRID = _Grid(1.0 / 16.0, 4)      # float64 x (then a Newton step): ~5e-10
_SLOPE_GRID = _Grid(1.0 / 64.0, 2)  # float32 f': ~1e-7, 3 indexed loads per element
_TINY = 1e-38           # left branch: |y| below this reads as this (f' < 1e-36 there)
_X_CAP = 1e4            # |x| cap: keeps inf inputs finite; f' is flat long before it


# The explicit float64 f and f' of each entry with a Numerical inverse (activations.formulas).
_FORMULAS: dict[str, Numerical] = {
    name: spec.inverse for name, spec in SPECS.items() if isinstance(spec.inverse, Numerical)
}
SUPPORTED: tuple[str, ...] = tuple(_FORMULAS)


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
    fm = _FORMULAS[name]
    f, slope, x_end = fm.f, fm.slope, fm.x_end
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


__all__ = ["SUPPORTED", "bisect", "derivative_from_output", "tanhshrink_half_derivative"]
