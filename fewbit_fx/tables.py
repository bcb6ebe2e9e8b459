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

import functools
import hashlib
import math
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
        np.linspace(lo, hi, 20001),
        np.arange(-_R, lo, _TAIL_STEP / 4),
        np.arange(hi, _R + 1e-9, _TAIL_STEP / 4),
        table.borders,
        _kinks(act, -_R, _R),
    )
    x, w = _nodes(edges)
    err = (_derivative(act, x) - table.q(torch.from_numpy(x)).numpy()) ** 2 * _eval_density(density, x)
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
    """packing.check_bits (the one bits validator), naming the argument that was wrong."""
    from fewbit_fx.packing import check_bits

    try:
        check_bits(bits)
    except ValueError:
        raise ValueError(f"{what} must be an integer in 1..{MAX_BITS}, got {bits!r}") from None


@functools.lru_cache(maxsize=_CACHED_FITS)
def _solve(act: Activation, max_bits: int, density: Density | None) -> tuple[Table, ...]:
    """Tables for bits 1..max_bits (index bits - 1)."""
    borders, cells = _cell_moments(act, density)
    S0, S1, S2 = np.pad(cells.cumsum(1), ((0, 0), (1, 0)))
    wanted = [2**b for b in range(1, max_bits + 1)]
    _, cuts = _dp_partition(S0, S1, S2, wanted[-1], wanted)
    return tuple(_make_table(act, borders, cells, cuts[k]) for k in wanted)


# Fitting runs in NumPy (float64, on the calling thread): the DP is thousands of small ops,
# and torch would spread each over its intra-op thread pool, whose barrier waits made it 20x
# slower on a busy machine. Limiting torch's threads instead would be process-wide, and refits
# run during the user's training. Only f' itself (Activation.derivative) is computed by torch.
def _dp_partition(S0, S1, S2, K: int,
                  wanted: list[int] | None = None) -> tuple[Tensor, dict[int, Tensor]]:
    """Optimal split of N cells into k contiguous segments, for every k = 1..K.

    S0, S1, S2 are prefix sums (length N + 1, leading 0; tensors or arrays) of the cells'
    weight w, w*v and w*v^2; a segment's cost is its weighted sum of squares about its
    weighted mean, S2 - S1^2 / S0. Returns the optimal total costs (float64 tensor, index
    k - 1) and, for each k in `wanted` (default all), the k - 1 cut positions (long tensor,
    ascending, in 1..N-1; cut c separates cells c - 1 and c). D[k, j] = min_i D[k-1, i] +
    cost(i, j) is a blocked, pruned min-plus product; only values are kept, argmins are
    recomputed while backtracking. Once the cost is zero (<= _ZERO_REL * S2[N], e.g. ReLU
    once every linear piece has its own segment) more segments cannot help: the DP stops
    and larger k split segments.
    """
    S0, S1, S2 = (np.asarray(S, dtype=np.float64) for S in (S0, S1, S2))
    N = S0.size - 1
    if not 1 <= K <= N:
        raise ValueError(f"cannot split {N} cells into {K} segments")
    costT = _segment_costs(S0, S1, S2)
    diag = np.concatenate([[np.inf], np.diagonal(costT, -1)])  # cost(j-1, j)
    D = np.full((K + 1, N + 1), np.inf)
    D[1] = costT[:, 0]
    buf = np.empty(_BLOCK * (N + 1))  # reused: big temporaries page-fault
    last = K
    for k in range(2, K + 1):
        if D[k - 1, N] <= _ZERO_REL * S2[N]:
            last = k - 1
            break
        prev = D[k - 1]
        # Prune: cost(i, j) >= cost(i, j0) for j >= j0, so in a block of columns j0..j1-1
        # a row i with D[k-1, i] + cost(i, j0) above every column's candidate i = j - 1
        # cannot win. Skip the rows before the first one that might.
        j0s = np.arange(k, N + 1, _BLOCK)
        cand = np.full(len(j0s) * _BLOCK, -np.inf)
        cand[: N + 1 - k] = prev[k - 1:N] + diag[k:]
        ub = cand.reshape(len(j0s), _BLOCK).max(1, keepdims=True)
        a = k - 1 + np.argmax(costT[j0s, k - 1:] + prev[k - 1:] <= ub, axis=1)
        for j0, a0 in zip(j0s.tolist(), a.tolist()):
            j1 = min(j0 + _BLOCK, N + 1)
            tmp = buf[: (j1 - j0) * (j1 - a0)].reshape(j1 - j0, j1 - a0)
            np.add(costT[j0:j1, a0:j1], prev[a0:j1], out=tmp)
            tmp.min(axis=1, out=D[k, j0:j1])

    cuts = {}
    for k in wanted if wanted is not None else range(1, K + 1):
        j, found = N, []
        for kk in range(min(k, last), 1, -1):
            j = int(np.argmin(D[kk - 1, :j] + costT[j, :j]))
            found.append(j)
        cuts[k] = _split_widest(found[::-1], k, N)
    costs = D[1:, N].copy()
    costs[last:] = costs[last - 1]
    return torch.from_numpy(costs), cuts


def _segment_costs(S0: np.ndarray, S1: np.ndarray, S2: np.ndarray) -> np.ndarray:
    """costT[j, i] = cost of cells i..j-1 (inf unless i < j), built in cache-sized row blocks."""
    N = S0.size - 1
    costT = np.empty((N + 1, N + 1))
    costT[0] = np.inf
    scratch = np.empty((2, _BLOCK * (N + 1)))  # reused: big temporaries page-fault
    upper = np.arange(_BLOCK) >= np.arange(_BLOCK)[:, None]  # i >= j within a diagonal block
    for r0 in range(1, N + 1, _BLOCK):
        r1 = min(r0 + _BLOCK, N + 1)
        n = (r1 - r0) * r1
        s0 = np.subtract(S0[r0:r1, None], S0[:r1], out=scratch[0, :n].reshape(r1 - r0, r1))
        s1 = np.subtract(S1[r0:r1, None], S1[:r1], out=scratch[1, :n].reshape(r1 - r0, r1))
        c = np.subtract(S2[r0:r1, None], S2[:r1], out=costT[r0:r1, :r1])
        np.multiply(s1, s1, out=s1)
        with np.errstate(divide="ignore", invalid="ignore"):
            np.divide(s1, s0, out=s1)
        np.copyto(s1, 0.0, where=s0 <= 0)  # no mass: no mean term (not 0/0)
        c -= s1
        np.maximum(c, 0.0, out=c)
        c[:, r0:][upper[: r1 - r0, : r1 - r0]] = np.inf  # columns i < r0 are all below j
        costT[r0:r1, r1:] = np.inf
    return costT


def _split_widest(cuts: list[int], k: int, N: int) -> Tensor:
    """Extend cuts to k segments by halving the segment with most cells (zero-cost DP)."""
    edges = [0, *cuts, N]
    while len(edges) - 1 < k:
        s = max(range(len(edges) - 1), key=lambda t: edges[t + 1] - edges[t])
        edges.insert(s + 1, (edges[s] + edges[s + 1]) // 2)
    return torch.tensor(edges[1:-1], dtype=torch.long)


def _make_table(act: Activation, borders: np.ndarray, cells: np.ndarray, cuts: Tensor) -> Table:
    """Levels and mse from direct per-segment sums (more accurate than prefix differences)."""
    cuts = cuts.numpy()
    seg = np.searchsorted(cuts, np.arange(cells.shape[1]), side="right")
    m0, m1, m2 = (np.bincount(seg, weights=c, minlength=cuts.size + 1) for c in cells)
    b = borders[cuts - 1]
    has_mass = m0 > 0
    levels = m1 / np.where(has_mass, m0, 1.0)
    if not has_mass.all():
        # An interval without mass keeps f' at its midpoint (ends clipped to +-_R): never NaN.
        ends = np.concatenate([[-_R], b, [_R]])
        levels = np.where(has_mass, levels, _derivative(act, 0.5 * (ends[:-1] + ends[1:])))
    mse = float(np.maximum(np.where(has_mass, m2 - m1 * levels, m2), 0.0).sum())
    total = float(m2.sum())
    rel = math.sqrt(mse / total) if total > 0 else 0.0
    return Table(borders=torch.from_numpy(b), levels=torch.from_numpy(levels), mse=mse, rel_rmse=rel)


# --- grid and quadrature (NumPy too, see _dp_partition) --------------------------------------
@functools.lru_cache(maxsize=_CACHED_FITS)
def _cell_moments(act: Activation, density: Density | None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate borders (GRID_CELLS - 1, or the density's own `grid_cells` - 1, kinks
    included) and per-cell integrals of p, f'p, f'^2 p (3 x cells); the outer cells reach
    to -+_R, i.e. hold the tails. Read-only: they are cached."""
    lo, hi = _support(density)
    borders = _shaped_grid(density, lo, hi, getattr(density, "grid_cells", GRID_CELLS) - 1)
    for k in _kinks(act, lo, hi):
        if lo < k < hi:  # the nearest interior grid point moves onto the kink
            borders[1 + np.argmin(np.abs(borders[1:-1] - k))] = k
    borders = _edges(borders)
    edges = _edges(
        borders,
        np.arange(-_R, lo, _TAIL_STEP),
        np.arange(hi, _R + 1e-9, _TAIL_STEP),
        _kinks(act, -_R, _R),
    )
    x, w = _nodes(edges)
    p = _eval_density(density, x) * w
    d = _derivative(act, x)
    parts = np.stack([p, p * d, p * d * d]).reshape(3, -1, _GL_NODES).sum(2)
    cell = np.searchsorted(borders, 0.5 * (edges[:-1] + edges[1:]))  # = torch.bucketize
    cells = np.stack([np.bincount(cell, weights=q, minlength=borders.size + 1) for q in parts])
    mass = float(cells[0].sum())
    if abs(mass - 1.0) > 1e-3:  # loose: a density's own jumps cost some quadrature accuracy
        raise ValueError(f"density integrates to {mass:.9g} on [-{_R:g}, {_R:g}]; it must be "
                         "normalised with negligible mass outside that range")
    borders.setflags(write=False)
    cells.setflags(write=False)
    return borders, cells


def _derivative(act: Activation, x: np.ndarray) -> np.ndarray:
    """f' at x: the one torch computation of a fit (autograd of the torch op itself)."""
    return act.derivative(torch.from_numpy(x)).numpy()


def _shaped_grid(density: Density | None, lo: float, hi: float, n: int) -> np.ndarray:
    """n points from lo to hi, spaced ~ 1 / (p^(1/3) + floor): the asymptotically optimal
    border density for smooth f' is ~ (p f''^2)^(1/3), and f'' is unknown here."""
    e = np.arange(lo, hi + _PROBE / 2, _PROBE)
    e[-1] = hi
    p = np.maximum(_eval_density(density, 0.5 * (e[:-1] + e[1:])), 0.0)
    p = (torch.from_numpy(p) ** (1 / 3)).numpy()  # torch's pow: the grid stays bit-identical
    w = (p / p.max() + _FLOOR) * (e[1:] - e[:-1])
    cdf = np.concatenate([[0.0], w.cumsum()])
    g = np.interp(np.linspace(0.0, cdf[-1], n), cdf, e)
    g[0], g[-1] = lo, hi
    # Snap to multiples of 2^-20 that are float32 numbers: a float32/bf16 kernel comparing
    # against float32 borders then gets exactly Table.codes, and symmetric p gives 0 exactly.
    return (np.round(g * 2**20) / 2**20).astype(np.float32).astype(np.float64)


@functools.lru_cache(maxsize=_CACHED_FITS)
def _support(density: Density | None) -> tuple[float, float]:
    """Range outside which the density has < _TAIL_EPS mass, rounded outward to 0.5."""
    e = np.arange(-_R, _R + _PROBE / 2, _PROBE)
    mass = _eval_density(density, 0.5 * (e[:-1] + e[1:])) * _PROBE
    cdf = np.concatenate([[0.0], mass.cumsum()])
    total = float(cdf[-1])
    if not math.isfinite(total) or total <= 0:
        raise ValueError("density must be non-negative with positive finite mass")
    lo = float(e[cdf <= _TAIL_EPS * total].max())
    hi = float(e[total - cdf <= _TAIL_EPS * total].min())
    lo, hi = math.floor(lo * 2) / 2, math.ceil(hi * 2) / 2
    if hi <= lo:
        raise ValueError("density support is too narrow")
    return lo, hi


def _eval_density(density: Density | None, x: np.ndarray) -> np.ndarray:
    if density is None:
        return np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    try:  # numpy first: numpy ufuncs on tensors warn; torch ops on arrays raise
        y = density(x)
    except Exception:
        y = density(torch.from_numpy(x))
    if isinstance(y, Tensor):
        y = y.detach().cpu()
    y = np.broadcast_to(np.asarray(y, dtype=np.float64), x.shape)
    if not np.isfinite(y).all() or (y < 0).any():
        raise ValueError("density must return finite non-negative values")
    return y


def _kinks(act: Activation, lo: float, hi: float) -> np.ndarray:
    k = np.array(act.kinks, dtype=np.float64)
    return k[(k >= lo) & (k <= hi)]


def _edges(*parts) -> np.ndarray:
    """Sorted distinct points of all parts (arrays or tensors)."""
    return np.unique(np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in parts]))


@functools.lru_cache(maxsize=None)
def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(_GL_NODES)


def _nodes(edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on every interval of `edges`, interval-major."""
    gx, gw = _gauss_legendre()
    half = 0.5 * (edges[1:] - edges[:-1])[:, None]
    mid = 0.5 * (edges[1:] + edges[:-1])[:, None]
    return (mid + half * gx).reshape(-1), (half * gw).reshape(-1)


__all__ = ["Table", "optimal_table", "all_tables", "derivative_mse", "SampleDensity",
           "random_subset", "sample_rel_rmse", "GRID_CELLS", "MAX_BITS"]
