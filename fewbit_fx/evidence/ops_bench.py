"""Micro-benchmark of the ops: forward and backward time per element of the plain torch
activation (autograd), FewBit (bits=1, 3, 4) and Inverted.

    python -m fewbit_fx bench-ops [--device cuda] [--sizes 20,24] [--json reports/ops.json]

All variants of one (activation, dtype, size) run interleaved in one process, so drift
(clocks, other load) hits them alike; each number is the median of the repeats. On CUDA
times are CUDA-event wall times and the table also gives achieved bandwidth as a share of
the device's measured copy bandwidth, counting each input read once and each output
written once. On the CPU torch runs on one thread (--threads) and the clock is that
thread's CPU time, which other processes on a shared machine cannot inflate; glibc is
told to keep freed memory (as CUDA's caching allocator does), since the page faults of
fresh allocations count in that time and made medians swing 2x between processes.
"""
from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn

from fewbit_fx.activations import Activation, get
from fewbit_fx.nn import FewBit, Inverted

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class _Plain(nn.Module):
    """The activation as torch runs it: autograd saves what torch's own backward needs."""

    def __init__(self, act: Activation) -> None:
        super().__init__()
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.act.forward(x)


def _variants(act: Activation, bits_list: list[int]) -> list[tuple[str, nn.Module, dict]]:
    """(name, module, traffic) where traffic gives bytes/element beyond the dtype's."""
    out = [("plain", _Plain(act), {})]
    for bits in bits_list:
        out.append((f"fewbit{bits}", FewBit(act, bits=bits), {"bits": bits}))
    if not (act.name in ("elu", "celu") and act.needs_mask):
        out.append(("inverted", Inverted(act), {"mask": act.needs_mask}))
    return out


def _traffic(name: str, info: dict, elem: int) -> tuple[float, float]:
    """Bytes per element moved by (forward, backward): inputs read once, outputs written once.

    plain: x -> y; grad and the saved tensor (x or y) -> grad_in. FewBit: x -> y + codes;
    grad + codes -> grad_in. Inverted: x -> y (+ mask); grad + y (+ mask) -> grad_in.
    """
    if name == "plain":
        return 2 * elem, 3 * elem
    if name.startswith("fewbit"):
        code = info["bits"] / 8
        return 2 * elem + code, 2 * elem + code
    mask = 1 / 8 if info["mask"] else 0.0
    return 2 * elem + mask, 3 * elem + mask


class _Clock:
    """Elapsed ns: CUDA events on the GPU; on the CPU the calling thread's CPU time when
    torch runs single-threaded (preemption does not count), else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.now = time.thread_time_ns if torch.get_num_threads() == 1 else time.perf_counter_ns

    def measure(self, fn: Callable[[], object]) -> tuple[float, object]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) * 1e6, out
        t0 = self.now()
        out = fn()
        return float(self.now() - t0), out


def keep_freed_memory() -> bool:
    """Make glibc reuse freed blocks instead of returning them to the OS (mallopt), so a
    timed call does not page-fault in its output. False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return all(libc.mallopt(opt, value) == 1 for opt, value in (
            (m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)))
    except (OSError, AttributeError):
        return False


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    clock = _Clock(device)
    for _ in range(3):
        dst.copy_(src)
    times = [clock.measure(lambda: dst.copy_(src))[0] for _ in range(repeats)]
    return 2 * nbytes / (statistics.median(times) * 1e-9)


def bench_case(act: Activation, n: int, dtype: torch.dtype, device: torch.device,
               bits_list: list[int], repeats: int, warmup: int) -> list[dict]:
    """Rows for one (activation, size, dtype): every variant, forward and backward."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_(True)
    grad = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
    variants = [(name, m.to(device), info) for name, m, info in _variants(act, bits_list)]
    clock = _Clock(device)
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, _, _ in variants}
    for r in range(warmup + repeats):
        for name, module, _ in variants:  # interleaved: every variant once per round
            t_fwd, y = clock.measure(lambda: module(x))
            t_bwd, _ = clock.measure(lambda: torch.autograd.grad(y, x, grad))
            del y
            if r >= warmup:
                times[name][0].append(t_fwd)
                times[name][1].append(t_bwd)
    rows = []
    for name, _, info in variants:
        fwd, bwd = (statistics.median(t) / n for t in times[name])
        rows.append({
            "act": str(act), "dtype": str(dtype).replace("torch.", ""), "numel": n,
            "device": device.type, "variant": name,
            "fwd_ns_per_elem": fwd, "bwd_ns_per_elem": bwd,
            "bytes_per_elem": dict(zip(("fwd", "bwd"), _traffic(name, info, x.element_size()))),
        })
    plain = next(r for r in rows if r["variant"] == "plain")
    for row in rows:
        for phase in ("fwd", "bwd"):
            row[f"{phase}_ratio"] = row[f"{phase}_ns_per_elem"] / plain[f"{phase}_ns_per_elem"]
        total = row["fwd_ns_per_elem"] + row["bwd_ns_per_elem"]
        row["total_ratio"] = total / (plain["fwd_ns_per_elem"] + plain["bwd_ns_per_elem"])
    return rows


def _add_bandwidth(rows: list[dict], copy_bw: float) -> None:
    for row in rows:
        for phase in ("fwd", "bwd"):
            achieved = row["bytes_per_elem"][phase] / (row[f"{phase}_ns_per_elem"] * 1e-9)
            row[f"{phase}_pct_copy_bw"] = 100.0 * achieved / copy_bw


def format_table(rows: list[dict]) -> str:
    bw = "fwd_pct_copy_bw" in rows[0] if rows else False
    head = ["act", "dtype", "numel", "variant", "fwd ns/el", "bwd ns/el", "fwd x", "bwd x", "total x"]
    if bw:
        head += ["fwd %bw", "bwd %bw"]
    lines = []
    for r in rows:
        cells = [r["act"], r["dtype"], f"2^{r['numel'].bit_length() - 1}", r["variant"],
                 f"{r['fwd_ns_per_elem']:.3f}", f"{r['bwd_ns_per_elem']:.3f}",
                 f"{r['fwd_ratio']:.2f}", f"{r['bwd_ratio']:.2f}", f"{r['total_ratio']:.2f}"]
        if bw:
            cells += [f"{r['fwd_pct_copy_bw']:.0f}", f"{r['bwd_pct_copy_bw']:.0f}"]
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    if argv and argv[0] == "--":  # `fewbit-fx bench-ops -- --sizes 20` passes the "--" on
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="fewbit-fx bench-ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--acts", default="gelu,silu,relu,tanh", help="registry names, comma-separated")
    p.add_argument("--sizes", default=None,
                   help="log2 of the element counts (default 20,24 on CUDA, 20 on CPU)")
    p.add_argument("--dtypes", default="fp32,bf16", help=f"from {','.join(_DTYPES)}")
    p.add_argument("--bits", default="1,3,4", help="FewBit widths")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 CUDA, 15 CPU)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="CPU only: torch threads (1: CPU-time clock)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(a.threads)
        keep_freed_memory()
    kernels = ("Inductor-compiled C++ kernels (fewbit_fx.kernels.cpu) at 64K+ elements"
               if os.environ.get("FEWBIT_FX_CPU_KERNELS", "1") != "0" else "torch ops")
    if cuda:
        from fewbit_fx.kernels import register_cuda_kernels

        kernels = "Triton kernels" if register_cuda_kernels() else "torch ops (no Triton)"
    sizes = [1 << int(s) for s in (a.sizes or ("20,24" if cuda else "20")).split(",")]
    repeats = a.repeats or (20 if cuda else 15)
    bits_list = [int(b) for b in a.bits.split(",") if b]
    acts = [get(name) for name in a.acts.split(",")]

    t0 = time.perf_counter()
    for act in acts:  # fit the tables first, outside the timings
        _variants(act, bits_list)
    setup = time.perf_counter() - t0
    copy_bw = copy_bandwidth(device) if cuda else None
    name = torch.cuda.get_device_name(device) if cuda else f"cpu ({a.threads} thread(s))"
    print(f"device: {name}; ops run as {kernels}; tables fitted in {setup:.1f} s")
    if copy_bw:
        print(f"measured copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write)")

    rows = []
    for act in acts:
        for dname in a.dtypes.split(","):
            for n in sizes:
                rows += bench_case(act, n, _DTYPES[dname], device, bits_list, repeats, a.warmup)
    if copy_bw:
        _add_bandwidth(rows, copy_bw)
    print(f"median of {repeats} rounds; x = time relative to the plain activation\n")
    print(format_table(rows))
    if a.json:
        meta = {"device": name, "kernels": kernels, "torch": torch.__version__,
                "copy_bandwidth_bytes_per_s": copy_bw, "repeats": repeats,
                "clock": "cuda events" if cuda else ("thread cpu time" if a.threads == 1 else "wall")}
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
