"""Accuracy and cost of fewbit_fx.inverse.derivative_from_output, per activation and dtype.

    python -m fewbit_fx.evidence.inverse_floor [--n 2000000] [--elements 4194304]

floor: max |f'(x*) - f'(x)| where x* inverts f(x) rounded to the dtype (what y alone
allows); error / error_far: ours, everywhere / with |x - x_min| > 0.05; "f32 out": the
error when f' is returned in float32 instead of being rounded to the half dtype.
Cost: ns per element on fp32 y, eager and Inductor-compiled, against torch's own backward
from x (aten.*_backward with grad = 1, one kernel), which the inverted method replaces.
"""
from __future__ import annotations

import argparse
import functools
import time
from typing import Callable

import torch

from fewbit_fx.activations import Activation, get
from fewbit_fx.inverse import SUPPORTED, bisect, derivative_from_output

_PLAIN = {  # torch's backward from the input x
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
    "mish": lambda g, x: torch.ops.aten.mish_backward(g, x),
    "tanhshrink": lambda g, x: g * torch.tanh(x) ** 2,  # autograd's formula
}


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
    far = (x - (_x_min(act.name) or 0.0)).abs() > 0.05
    return dict(floor=floor, error=err.max().item(), error_far=err[far].max().item())


def gradient_floor_and_error(
    act: Activation, dtype: torch.dtype, gradient: Callable[[torch.Tensor], torch.Tensor],
    n: int = 2_000_000, seed: int = 0,
) -> dict:
    """floor_and_error for a whole forward and backward: gradient(x) is f'(x) as the
    gradient of a y = f(x) that it computes itself from x in dtype (say, a compiled
    Inverted module), so the rounding of that y counts too. The samples and the floor
    are floor_and_error's; any registry activation (closed forms and formula twins invert
    their float64 torch forward; samples within 1e-3 of a kink are left out)."""
    x, _, _, exact, floor = _reference(act.name, dtype, n, seed)
    err = (gradient(x.to(dtype)).double() - exact).abs()
    far = (x - (_functions(act.name)[2] or 0.0)).abs() > 0.05
    return dict(floor=floor, error=err.max().item(), error_far=err[far].max().item())


def _functions(name: str):
    """(f, f', x_min) in float64: the inverse's explicit formulas where it has them, else
    the torch forward and its autograd derivative."""
    act = get(name)
    if name in SUPPORTED:
        numerical = act.spec.inverse  # the registry's explicit float64 f and f'
        return numerical.f, numerical.slope, _x_min(name)
    return act.forward, act.derivative, act.x_min


def _x_min(name: str) -> float | None:
    """The minimum to the last bit (f' = 0), as fewbit_fx.inverse finds it for its tables."""
    if get(name).monotone:
        return None
    one = torch.ones((), dtype=torch.float64)
    return bisect(get(name).spec.inverse.slope, 0 * one, -6 * one, 0 * one, one < 0).item()


@functools.lru_cache(maxsize=2)
def _reference(name: str, dtype: torch.dtype, n: int, seed: int):
    """Samples, rounded y, branch, exact f'(x) and the floor (the slow bisection part)."""
    f, slope, x_min = _functions(name)
    center = x_min if x_min is not None else 0.0
    gen = torch.Generator().manual_seed(seed)
    m = max(n // 20, 1000)
    tail = torch.logspace(-3, 2, m, dtype=torch.float64)
    parts = [2.0 * torch.randn(n, generator=gen, dtype=torch.float64), tail, -tail,
             torch.tensor([1e3, -1e3, 6e4, -6e4], dtype=torch.float64)]
    parts += [center + torch.linspace(-w, w, m, dtype=torch.float64) for w in (1e-4, 1e-3, 1e-2, 0.1)]
    x = torch.cat(parts).to(dtype).double()
    for k in get(name).kinks:
        x = x[(x - k).abs() > 1e-3]
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


def _ns_per_element(fn, *args, repeat: int = 7) -> float:
    fn(*args)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn(*args)
        best = min(best, time.perf_counter() - t)
    return best / args[0].numel() * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2_000_000, help="N(0, 4) samples per case")
    ap.add_argument("--elements", type=int, default=1 << 22, help="elements for the timing")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, n = {args.n}\n")
    print(f"{'activation':<11}{'dtype':<9}{'floor':>10}{'error':>10}{'err/floor':>10}"
          f"{'error_far':>11}{'f32 out':>10}")
    for name in SUPPORTED:
        act = get(name)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            r = floor_and_error(act, dtype, n=args.n)
            r32 = floor_and_error(act, dtype, n=args.n, out_dtype=torch.float32)
            print(f"{name:<11}{str(dtype)[6:]:<9}{r['floor']:>10.2e}{r['error']:>10.2e}"
                  f"{r['error'] / r['floor']:>10.3f}{r['error_far']:>11.2e}{r32['error']:>10.2e}",
                  flush=True)

    print(f"\ncost on {args.elements} fp32 elements, ns/element (min of 7)")
    print(f"{'activation':<11}{'eager':>8}{'compiled':>10}{'torch bwd':>11}{'compiled/bwd':>14}")
    gen = torch.Generator().manual_seed(0)
    x = 2.0 * torch.randn(args.elements, generator=gen)
    grad = torch.ones_like(x)
    for name in SUPPORTED:
        act = get(name)
        y = act.forward(x)
        right = None if act.x_min is None else x > act.x_min
        compiled = torch.compile(lambda y, r, a=act: derivative_from_output(a, y, r), fullgraph=True)
        eager = _ns_per_element(lambda y, r: derivative_from_output(act, y, r), y, right)
        fused = _ns_per_element(compiled, y, right)
        plain = _ns_per_element(lambda g, x: _PLAIN[name](g, x), grad, x)
        print(f"{name:<11}{eager:>8.1f}{fused:>10.2f}{plain:>11.2f}{fused / plain:>14.1f}", flush=True)


if __name__ == "__main__":
    main()
