"""Optimal few-bit tables: a piecewise-constant stand-in q(x) for an activation's f'(x).

With 2^bits levels, the forward pass stores only the interval index (code) of each input and
the backward pass multiplies the incoming gradient by the level of that interval. The table
minimises the p-weighted squared error of the derivative,

    mse = integral (f'(x) - q(x))^2 p(x) dx,     p = N(0, 1) density unless given,

and reports  rel_rmse = sqrt(mse / E_p[f'(x)^2])  (error relative to the derivative's RMS).
`SampleDensity` turns observed inputs into p, so a table can be fitted to what a layer of a
trained network really sees (fewbit_fx.calibration).

Borders are restricted to a fine grid (`GRID_CELLS` cells, denser where p is large, every
kink of f' inserted exactly, so piecewise-linear functions come out exact), on which the
optimum is found exactly by dynamic programming: the best level on an interval is the
p-weighted mean of f' there, so an interval's cost needs only the integrals of p, f'p and
f'^2 p over it. The outer cells reach into the tails; the whole mass is accounted for.

Code convention: code(x) = torch.bucketize(x, borders) (right=False), so an x lying exactly
on a border goes to the LEFT interval. That matches torch's derivative at ReLU's kink
(f'(0) = 0) and at the lower kinks of relu6/hardtanh/hardsigmoid/hardswish; at their upper
kinks torch takes the right-hand value. A measure-zero set: it does not affect the fit.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from .activations import Activation

Density = Callable[[Tensor], Tensor]

GRID_CELLS = 3000     # cells of the border grid (candidate borders + 1)
MAX_BITS = 8
_R = 64.0             # densities are integrated on [-_R, _R]; their mass beyond must be negligible
_TAIL_EPS = 1e-14     # the border grid spans the range outside which the density has < this mass
_PROBE = 1.0 / 64     # spacing of the probe grid used to find the support and shape the grid
_FLOOR = 0.05         # share of uniform spacing mixed into the p^(1/3) grid density
_GL_NODES = 8         # Gauss-Legendre nodes per quadrature interval
_TAIL_STEP = 0.125    # quadrature interval length outside the border grid
_BLOCK = 128          # DP column block (keeps the min-plus working set in cache)
_ZERO_REL = 1e-14     # relative mse treated as exact (rounding noise of the cost sums)
_CACHED_FITS = 512    # bounded: refitting during training makes a new density every time


@dataclass(frozen=True, eq=False)  # eq=False: tensor fields; identity equality and hash
class Table:
    """Few-bit table: borders split the real line into len(levels) intervals."""

    borders: Tensor   # float64, 2^bits - 1 sorted interior borders
    levels: Tensor    # float64, 2^bits values of q
    mse: float        # integral (f' - q)^2 p dx
    rel_rmse: float   # sqrt(mse / E_p[f'^2])

    @property
    def bits(self) -> int:
        return int(self.levels.numel()).bit_length() - 1

    def codes(self, x: Tensor) -> Tensor:
        """Interval index of each x; a point on a border goes left (see module doc)."""
        return torch.bucketize(x.to(torch.float64), self.borders)

    def q(self, x: Tensor) -> Tensor:
        """The piecewise-constant derivative q(x), float64."""
        return self.levels[self.codes(x)]


# --- public API -----------------------------------------------------------------------
def optimal_table(act: Activation, bits: int, density: Density | None = None) -> Table:
    """MSE-optimal table with 2^bits levels for `act` under `density` (None: N(0, 1)).

    Cached per (act, bits, density); a density is keyed by identity, so reuse the same
    callable to hit the cache.
    """
    _check_bits(bits, "bits")
    return _solve(act, int(bits), density)[-1]


def all_tables(act: Activation, max_bits: int = MAX_BITS,
               density: Density | None = None) -> dict[int, Table]:
    """Tables for every bits in 1..max_bits from one DP run (the DP to K segments yields
    the optimum for every smaller K too). Identical to the optimal_table results."""
    _check_bits(max_bits, "max_bits")
    return dict(enumerate(_solve(act, int(max_bits), density), start=1))


def derivative_mse(act: Activation, table: Table, density: Density | None = None) -> float:
    """integral (f' - q)^2 p dx by dense quadrature, independent of the DP's cell sums."""
    lo, hi = _support(density)
    edges = _edges(
        torch.linspace(lo, hi, 20001, dtype=torch.float64),
        torch.arange(-_R, lo, _TAIL_STEP / 4, dtype=torch.float64),
        torch.arange(hi, _R + 1e-9, _TAIL_STEP / 4, dtype=torch.float64),
        table.borders,
        _kinks(act, -_R, _R),
    )
    with _one_thread():
        x, w = _nodes(edges)
        err = (act.derivative(x) - table.q(x)) ** 2 * _eval_density(density, x)
        return float((err * w).sum())


class SampleDensity:
    """Density of observed inputs: a histogram on a 1/32 grid smoothed by a Gaussian kernel
    (Silverman's bandwidth), so a few thousand samples already give a usable fit; f' is
    smooth, so the table does not need fine detail of p. Inputs beyond +-_CLAMP count at
    +-_CLAMP (every supported f' is constant out there). Equal samples give an equal
    density (hash of the histogram), so refitting the same data hits the table cache.
    """

    _BIN = 1.0 / 32
    _CLAMP = _R - 4.0
    # A coarser border grid than GRID_CELLS: ~10x faster (refits run during training) and
    # within 0.01% of the 3000-cell optimum's mse at 1-4 bits (measured, GELU).
    grid_cells = 1000

    def __init__(self, samples: Tensor) -> None:
        s = _finite(samples)
        if s.numel() == 0:
            raise ValueError("SampleDensity needs at least one finite sample")
        s = s.clamp(-self._CLAMP, self._CLAMP)
        self.samples = s.numel()
        bins = int(round(2 * _R / self._BIN))
        counts = torch.histc(s, bins=bins, min=-_R, max=_R)
        sigma = self._bandwidth(s) / self._BIN  # in bins
        radius = int(math.ceil(4 * sigma))
        k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        smooth = torch.nn.functional.conv1d(counts[None, None], (k / k.sum())[None, None],
                                            padding=radius)[0, 0]
        smooth[0] = smooth[-1] = 0.0  # zero at the ends: the interpolant's mass is the bins' mass
        self._x = (-_R + self._BIN * (torch.arange(bins, dtype=torch.float64) + 0.5)).numpy()
        self._p = (smooth / (smooth.sum() * self._BIN)).numpy()
        self._key = hashlib.sha1(self._p.tobytes()).hexdigest()

    def _bandwidth(self, s: Tensor) -> float:
        n = s.numel()
        spread = float(s.std()) if n > 1 else 0.0
        if n > 1:
            q = torch.quantile(s[:: max(1, n // 20_000)], torch.tensor([0.25, 0.75], dtype=torch.float64))
            iqr = float(q[1] - q[0]) / 1.349
            spread = min(spread, iqr) if iqr > 0 else spread
        return max(0.9 * spread * n ** -0.2, 2 * self._BIN)

    def __call__(self, x):
        return np.interp(np.asarray(x, dtype=np.float64), self._x, self._p, left=0.0, right=0.0)

    def __eq__(self, other) -> bool:
        return isinstance(other, SampleDensity) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        return f"SampleDensity({self.samples} samples)"


def _finite(samples: Tensor) -> Tensor:
    """The finite values of samples, flat, float64 on the CPU."""
    s = samples.detach().reshape(-1).to("cpu", torch.float64)
    return s[torch.isfinite(s)]


def random_subset(x: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """At most n elements of x drawn at random (with replacement), flattened; all of x if
    it is that small. The generator is the caller's, so the global RNG is untouched."""
    flat = x.detach().reshape(-1)
    if flat.numel() <= n:
        return flat
    return flat[torch.randint(0, flat.numel(), (n,), generator=generator).to(flat.device)]


def sample_rel_rmse(act: Activation, table: Table, samples: Tensor) -> float:
    """The table's derivative error on the samples themselves, relative to f''s RMS there:
    sqrt(mean (f' - q)^2 / mean f'^2). A direct measurement, independent of the fit."""
    x = _finite(samples)
    d = act.derivative(x)
    total = float((d * d).mean())
    return math.sqrt(float(((d - table.q(x)) ** 2).mean()) / total) if total > 0 else 0.0


# --- fitting ----------------------------------------------------------------------------
def _check_bits(bits, what: str) -> None:
    if (not isinstance(bits, numbers.Integral) or isinstance(bits, bool)
            or not 1 <= int(bits) <= MAX_BITS):
        raise ValueError(f"{what} must be an integer in 1..{MAX_BITS}, got {bits!r}")


@functools.lru_cache(maxsize=_CACHED_FITS)
def _solve(act: Activation, max_bits: int, density: Density | None) -> tuple[Table, ...]:
    """Tables for bits 1..max_bits (index bits - 1)."""
    with _one_thread():
        borders, cells = _cell_moments(act, density)
        S0, S1, S2 = torch.nn.functional.pad(cells.cumsum(1), (1, 0))
        wanted = [2**b for b in range(1, max_bits + 1)]
        _, cuts = _dp_partition(S0, S1, S2, wanted[-1], wanted)
        return tuple(_make_table(act, borders, cells, cuts[k]) for k in wanted)


@contextlib.contextmanager
def _one_thread():
    """The DP is thousands of small ops: intra-op threads only add barrier waits, which
    on a busy machine made it 20x slower. (torch's thread count is process-wide.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _dp_partition(S0: Tensor, S1: Tensor, S2: Tensor, K: int,
                  wanted: list[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """Optimal split of N cells into k contiguous segments, for every k = 1..K.

    S0, S1, S2 are prefix sums (length N + 1, leading 0) of the cells' weight w, w*v and
    w*v^2; a segment's cost is its weighted sum of squares about its weighted mean,
    S2 - S1^2 / S0. Returns the optimal total costs (index k - 1) and, for each k in
    `wanted` (default all), the k - 1 cut positions (ascending, in 1..N-1; cut c separates
    cells c - 1 and c). D[k, j] = min_i D[k-1, i] + cost(i, j) is a blocked, pruned
    min-plus product; only values are kept, argmins are recomputed while backtracking.
    Once the cost is zero (<= _ZERO_REL * S2[N], e.g. ReLU once every linear piece has its
    own segment) more segments cannot help: the DP stops and larger k split segments.
    """
    N = S0.numel() - 1
    if not 1 <= K <= N:
        raise ValueError(f"cannot split {N} cells into {K} segments")
    costT = _segment_costs(S0, S1, S2)
    diag = torch.cat([costT.new_full((1,), torch.inf), costT.diagonal(-1)])  # cost(j-1, j)
    D = torch.full((K + 1, N + 1), torch.inf, dtype=torch.float64)
    D[1] = costT[:, 0]
    buf = torch.empty(_BLOCK * (N + 1), dtype=torch.float64)  # reused: big temporaries page-fault
    last = K
    for k in range(2, K + 1):
        if D[k - 1, N] <= _ZERO_REL * S2[N]:
            last = k - 1
            break
        prev = D[k - 1]
        # Prune: cost(i, j) >= cost(i, j0) for j >= j0, so in a block of columns j0..j1-1
        # a row i with D[k-1, i] + cost(i, j0) above every column's candidate i = j - 1
        # cannot win. Skip the rows before the first one that might.
        j0s = torch.arange(k, N + 1, _BLOCK)
        cand = torch.nn.functional.pad(prev[k - 1:N] + diag[k:],
                                       (0, len(j0s) * _BLOCK - N - 1 + k), value=-torch.inf)
        ub = cand.view(len(j0s), _BLOCK).amax(1, keepdim=True)
        a = (k - 1 + (costT[j0s, k - 1:] + prev[k - 1:] <= ub).to(torch.uint8).argmax(1)).tolist()
        for j0, a0 in zip(j0s.tolist(), a):
            j1 = min(j0 + _BLOCK, N + 1)
            tmp = torch.add(costT[j0:j1, a0:j1], prev[a0:j1],
                            out=buf[: (j1 - j0) * (j1 - a0)].view(j1 - j0, j1 - a0))
            torch.amin(tmp, dim=1, out=D[k, j0:j1])

    cuts = {}
    for k in wanted if wanted is not None else range(1, K + 1):
        j, found = N, []
        for kk in range(min(k, last), 1, -1):
            j = int(torch.argmin(D[kk - 1, :j] + costT[j, :j]))
            found.append(j)
        cuts[k] = _split_widest(found[::-1], k, N)
    costs = D[1:, N].clone()
    costs[last:] = costs[last - 1]
    return costs, cuts


def _segment_costs(S0: Tensor, S1: Tensor, S2: Tensor) -> Tensor:
    """costT[j, i] = cost of cells i..j-1 (inf unless i < j), built in cache-sized row blocks."""
    N = S0.numel() - 1
    costT = torch.empty((N + 1, N + 1), dtype=torch.float64)
    costT[0] = torch.inf
    for r0 in range(1, N + 1, _BLOCK):
        r1 = min(r0 + _BLOCK, N + 1)
        s0 = S0[r0:r1, None] - S0[None, :r1]
        s1 = S1[r0:r1, None] - S1[None, :r1]
        c = torch.sub(S2[r0:r1, None], S2[None, :r1], out=costT[r0:r1, :r1])
        c.sub_(torch.where(s0 > 0, s1.mul_(s1).div_(s0), 0.0)).clamp_min_(0)  # s0 = 0: no mass
        c.masked_fill_(torch.arange(r1) >= torch.arange(r0, r1)[:, None], torch.inf)
        costT[r0:r1, r1:] = torch.inf
    return costT


def _split_widest(cuts: list[int], k: int, N: int) -> Tensor:
    """Extend cuts to k segments by halving the segment with most cells (zero-cost DP)."""
    edges = [0, *cuts, N]
    while len(edges) - 1 < k:
        s = max(range(len(edges) - 1), key=lambda t: edges[t + 1] - edges[t])
        edges.insert(s + 1, (edges[s] + edges[s + 1]) // 2)
    return torch.tensor(edges[1:-1], dtype=torch.long)


def _make_table(act: Activation, borders: Tensor, cells: Tensor, cuts: Tensor) -> Table:
    """Levels and mse from direct per-segment sums (more accurate than prefix differences)."""
    seg = torch.bucketize(torch.arange(cells.shape[1]), cuts, right=True)
    sums = torch.zeros(3, cuts.numel() + 1, dtype=torch.float64).index_add_(1, seg, cells)
    m0, m1, m2 = sums
    b = borders[cuts - 1]
    # An interval without mass keeps f' at its midpoint (ends clipped to +-_R): never NaN.
    ends = torch.cat([b.new_tensor([-_R]), b, b.new_tensor([_R])])
    fallback = act.derivative(0.5 * (ends[:-1] + ends[1:]))
    has_mass = m0 > 0
    levels = torch.where(has_mass, m1 / torch.where(has_mass, m0, 1.0), fallback)
    mse = float(torch.where(has_mass, m2 - m1 * levels, m2).clamp_min(0).sum())
    total = float(m2.sum())
    rel = math.sqrt(mse / total) if total > 0 else 0.0
    return Table(borders=b, levels=levels, mse=mse, rel_rmse=rel)


# --- grid and quadrature --------------------------------------------------------------------
@functools.lru_cache(maxsize=_CACHED_FITS)
def _cell_moments(act: Activation, density: Density | None) -> tuple[Tensor, Tensor]:
    """Candidate borders (GRID_CELLS - 1, or the density's own `grid_cells` - 1, kinks
    included) and per-cell integrals of p, f'p, f'^2 p (3 x cells); the outer cells reach
    to -+_R, i.e. hold the tails."""
    lo, hi = _support(density)
    borders = _shaped_grid(density, lo, hi, getattr(density, "grid_cells", GRID_CELLS) - 1)
    for k in _kinks(act, lo, hi):
        if lo < k < hi:  # the nearest interior grid point moves onto the kink
            borders[1 + torch.argmin((borders[1:-1] - k).abs())] = k
    borders = _edges(borders)
    edges = _edges(
        borders,
        torch.arange(-_R, lo, _TAIL_STEP, dtype=torch.float64),
        torch.arange(hi, _R + 1e-9, _TAIL_STEP, dtype=torch.float64),
        _kinks(act, -_R, _R),
    )
    x, w = _nodes(edges)
    p = _eval_density(density, x) * w
    d = act.derivative(x)
    parts = torch.stack([p, p * d, p * d * d]).view(3, -1, _GL_NODES).sum(2)
    mids = 0.5 * (edges[:-1] + edges[1:])
    cell = torch.bucketize(mids, borders)
    cells = torch.zeros(3, borders.numel() + 1, dtype=torch.float64).index_add_(1, cell, parts)
    mass = float(cells[0].sum())
    if abs(mass - 1.0) > 1e-3:  # loose: a density's own jumps cost some quadrature accuracy
        raise ValueError(f"density integrates to {mass:.9g} on [-{_R:g}, {_R:g}]; it must be "
                         "normalised with negligible mass outside that range")
    return borders, cells


def _shaped_grid(density: Density | None, lo: float, hi: float, n: int) -> Tensor:
    """n points from lo to hi, spaced ~ 1 / (p^(1/3) + floor): the asymptotically optimal
    border density for smooth f' is ~ (p f''^2)^(1/3), and f'' is unknown here."""
    e = torch.arange(lo, hi + _PROBE / 2, _PROBE, dtype=torch.float64)
    e[-1] = hi
    p = _eval_density(density, 0.5 * (e[:-1] + e[1:])).clamp_min(0) ** (1 / 3)
    w = (p / p.max() + _FLOOR) * (e[1:] - e[:-1])
    cdf = torch.cat([w.new_zeros(1), w.cumsum(0)])
    t = np.linspace(0.0, float(cdf[-1]), n)
    g = torch.from_numpy(np.interp(t, cdf.numpy(), e.numpy()))
    g[0], g[-1] = lo, hi
    # Snap to multiples of 2^-20 that are float32 numbers: a float32/bf16 kernel comparing
    # against float32 borders then gets exactly Table.codes, and symmetric p gives 0 exactly.
    return (torch.round(g * 2**20) / 2**20).float().double()


@functools.lru_cache(maxsize=_CACHED_FITS)
def _support(density: Density | None) -> tuple[float, float]:
    """Range outside which the density has < _TAIL_EPS mass, rounded outward to 0.5."""
    e = torch.arange(-_R, _R + _PROBE / 2, _PROBE, dtype=torch.float64)
    mass = _eval_density(density, 0.5 * (e[:-1] + e[1:])) * _PROBE
    cdf = torch.cat([mass.new_zeros(1), mass.cumsum(0)])
    total = float(cdf[-1])
    if not math.isfinite(total) or total <= 0:
        raise ValueError("density must be non-negative with positive finite mass")
    lo = float(e[cdf <= _TAIL_EPS * total].max())
    hi = float(e[total - cdf <= _TAIL_EPS * total].min())
    lo, hi = math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2
    if hi <= lo:
        raise ValueError("density support is too narrow")
    return lo, hi


def _eval_density(density: Density | None, x: Tensor) -> Tensor:
    if density is None:
        return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    try:  # numpy first: numpy ufuncs on tensors warn; torch ops on arrays raise
        y = density(x.numpy())
    except Exception:
        y = density(x)
    y = torch.as_tensor(y if isinstance(y, Tensor) else np.asarray(y), dtype=torch.float64)
    y = y.broadcast_to(x.shape)
    if not bool(torch.isfinite(y).all()) or bool((y < 0).any()):
        raise ValueError("density must return finite non-negative values")
    return y


def _kinks(act: Activation, lo: float, hi: float) -> Tensor:
    k = torch.tensor(act.kinks, dtype=torch.float64)
    return k[(k >= lo) & (k <= hi)]


def _edges(*parts: Tensor) -> Tensor:
    return torch.unique(torch.cat([p.to(torch.float64).reshape(-1) for p in parts]))


@functools.lru_cache(maxsize=None)
def _gauss_legendre() -> tuple[Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(_GL_NODES)
    return torch.from_numpy(x), torch.from_numpy(w)


def _nodes(edges: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights on every interval of `edges`, interval-major."""
    gx, gw = _gauss_legendre()
    half = 0.5 * (edges[1:] - edges[:-1])[:, None]
    mid = 0.5 * (edges[1:] + edges[:-1])[:, None]
    return (mid + half * gx).reshape(-1), (half * gw).reshape(-1)


__all__ = ["Table", "optimal_table", "all_tables", "derivative_mse", "SampleDensity",
           "random_subset", "sample_rel_rmse", "GRID_CELLS", "MAX_BITS"]
