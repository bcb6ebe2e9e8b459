#!/usr/bin/env python3
"""Dry-run report of every catalog model (fewbit_fx.evidence.models) in modes auto/exact/fewbit.

    python -m fewbit_fx.evidence.real_models            # scale "small"
    python -m fewbit_fx.evidence.real_models tiny --models gpt2 bert --no-plan-timing

For each model and mode, fewbit_fx.report() gives the per-site estimate and the measured
bytes saved for backward in one real training step (parameters excluded) of the original
and of a rewritten copy. Writes reports/real_models.md and reports/real_models.json.
It also times the analysis (capture + saves + decisions, fewbit_fx.api.analyse) of GPT-2 at
"base" scale (the real GPT-2 small size: 12 x 768, vocab 50257, sequence 128).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

import fewbit_fx
from fewbit_fx.evidence import models
from fewbit_fx.api import analyse
from fewbit_fx.measure import scalar_loss

MODES = ("auto", "exact", "fewbit")
ROOT = Path(__file__).resolve().parent.parent


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def pct(after: int | None, before: int | None) -> str:
    return "n/a" if not before or after is None else f"{100.0 * (after - before) / before:+.1f}%"


def run_model(name: str, scale: str, bits: int) -> list[dict]:
    out = []
    for mode in MODES:
        model, args, kwargs = models.build(name, scale)
        params = sum(p.numel() for p in model.parameters())
        t = time.perf_counter()
        rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode=mode, bits=bits)
        seconds = time.perf_counter() - t
        variants: dict[str, int] = {}
        for r in rep.rows:
            variants[r.variant] = variants.get(r.variant, 0) + 1
        entry = {
            "model": name, "scale": scale, "mode": mode, "bits": bits, "parameters": params,
            "model_class": type(model).__name__,
            "sites": len(rep.rows), "rewritten": sum(r.variant != "kept" for r in rep.rows),
            "variants": variants,
            "estimated_before": rep.total_before, "estimated_after": rep.total_after,
            "measured_before": rep.measured_before, "measured_after": rep.measured_after,
            "measured_change_pct": (None if not rep.measured_before else
                                    100.0 * (rep.measured_after - rep.measured_before) / rep.measured_before),
            "report_seconds": round(seconds, 2),
            "gradient_relative_error": gradient_error(name, scale, mode, bits),
            "gradient_relative_error_normal_tables": (
                gradient_error(name, scale, mode, bits, "normal")
                if any(r.variant.startswith("fewbit") for r in rep.rows) else None),
            "rows": rep.to_dict()["rows"],
        }
        out.append(entry)
        print(f"{name:15s} {mode:6s} sites {entry['sites']:3d} rewritten {entry['rewritten']:3d} "
              f"estimate {mib(rep.total_before)} -> {mib(rep.total_after)} MiB, measured "
              f"{mib(rep.measured_before)} -> {mib(rep.measured_after)} MiB "
              f"({pct(rep.measured_after, rep.measured_before)}), grad rel err "
              f"{entry['gradient_relative_error']:.2e} [{seconds:.1f} s]", flush=True)
    return out


def gradient_error(name: str, scale: str, mode: str, bits: int, tables: str = "fitted") -> float:
    """||g - g_exact|| / ||g_exact|| over all parameter gradients of one training step:
    the optimized model against the unchanged one (same weights and inputs, float32).
    optimize() sees other inputs than the step (same shapes, fresh random values), so
    fitted tables are measured out of sample."""
    exact = exact_gradients(name, scale)
    grads = step_gradients(name, scale, dict(mode=mode, bits=bits, tables=tables))
    return ((grads - exact).norm() / exact.norm()).item()


@functools.lru_cache(maxsize=1)  # models run one after another: reused across their modes
def exact_gradients(name: str, scale: str) -> torch.Tensor:
    return step_gradients(name, scale)


def step_gradients(name: str, scale: str, optimize: dict | None = None) -> torch.Tensor:
    """All parameter gradients of one training step, optionally after optimize(**optimize)
    on fresh inputs of the same shapes."""
    model, args, kwargs = models.build(name, scale)
    if optimize is not None:
        fewbit_fx.optimize(model, example_inputs=fresh_like(args),
                           example_kwargs=fresh_like(kwargs), **optimize)
    scalar_loss(model(*args, **kwargs)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def fresh_like(inputs):
    """The same structure with new random values: token ids uniform over the ids' range,
    floats standard normal (a generator of its own: the global RNG is untouched)."""
    g = torch.Generator().manual_seed(12345)

    def fresh(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=t.dtype)
        return torch.randint(int(t.min()), int(t.max()) + 1, t.shape, generator=g, dtype=t.dtype)

    if isinstance(inputs, dict):
        return {k: fresh(v) for k, v in inputs.items()}
    return tuple(fresh(t) for t in inputs)


def time_plan(name: str = "gpt2", scale: str = "base", repeats: int = 2) -> dict:
    """Wall time of the analysis (Dynamo capture + saves + decisions) with no rewrite."""
    model, args, kwargs = models.build(name, scale)
    params = sum(p.numel() for p in model.parameters())
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        p = analyse(model, args, kwargs, "auto", 3, None)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    t = time.perf_counter()
    with torch.no_grad():
        model(*args, **kwargs)
    forward = time.perf_counter() - t
    t = time.perf_counter()
    fewbit_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    optimize_s = time.perf_counter() - t
    return {
        "model": name, "scale": scale, "parameters": params,
        "inputs": {k: list(v.shape) for k, v in kwargs.items()},
        "sites": len(p.planned),
        "variants": sorted({x.decision.label for x in p.planned}),
        "plan_seconds": [round(x, 2) for x in times],
        "plan_cpu_seconds": [round(x, 2) for x in cpu],
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "optimize_seconds": round(optimize_s, 2),
        "eager_forward_seconds_no_grad": round(forward, 3),
    }


def write_markdown(path: Path, entries: list[dict], timing: dict | None, meta: dict) -> None:
    lines = [
        "# fewbit-fx on the model catalog",
        "",
        f"Scale `{meta['scale']}`, bits {meta['bits']}; torch {meta['torch']}, transformers "
        f"{meta['transformers']}, {meta['machine']}; generated {meta['date']} by "
        "`python -m fewbit_fx.evidence.real_models`.",
        "",
        "Estimated: the per-site estimate of the saves analysis (bytes kept for backward "
        "at the activation sites only). Measured: bytes of distinct storages saved for "
        "backward in one real training step of the whole model (parameters excluded), "
        "original vs rewritten copy. MiB.",
        "",
        "Gradient error: the relative L2 error of all parameter gradients of one training "
        "step, rewritten vs original model (same weights and inputs, float32): inverted is "
        "exact up to float32 rounding, few-bit is an approximation. Few-bit tables are fitted "
        "to other inputs than the step's (same shapes, fresh random values); the last "
        "column repeats the few-bit rows with the N(0, 1) tables (tables='normal').",
        "",
        "| model | mode | sites | rewritten | estimated before | estimated after "
        "| measured before | measured after | measured change | gradient error "
        "| gradient error, N(0,1) tables |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['mode']} | {e['sites']} | {e['rewritten']} "
            f"| {mib(e['estimated_before'])} | {mib(e['estimated_after'])} "
            f"| {mib(e['measured_before'])} | {mib(e['measured_after'])} "
            f"| {pct(e['measured_after'], e['measured_before'])} | {e['gradient_relative_error']:.1e} "
            f"| {_sci(e.get('gradient_relative_error_normal_tables'))} |"
        )
    lines += ["", "Decisions per model and mode (number of sites per variant):", ""]
    for e in entries:
        v = ", ".join(f"{k}: {n}" for k, n in sorted(e["variants"].items()))
        lines.append(f"- {e['model']} / {e['mode']}: {v or 'no sites'}")
    if timing:
        lines += [
            "",
            "## Analysis time, GPT-2 small (base scale)",
            "",
            f"GPT-2 at `base` scale: {timing['parameters'] / 1e6:.1f}M parameters, inputs "
            f"{timing['inputs']}, {timing['sites']} sites ({', '.join(timing['variants'])}).",
            "",
            f"- analysis (`fewbit_fx.api.analyse`: Dynamo capture + saves + decisions), per run: "
            f"{', '.join(f'{s:.2f} s' for s in timing['plan_seconds'])} wall "
            f"({', '.join(f'{s:.2f} s' for s in timing['plan_cpu_seconds'])} process CPU time; "
            f"{timing['cpu_count']} CPUs, 1-min load average {timing['load_average_1min']} "
            "at the end, so wall times include waiting for other processes)",
            f"- full `optimize()` (analysis + rewrite): {timing['optimize_seconds']:.2f} s",
            f"- for scale: one eager forward (no grad): {timing['eager_forward_seconds_no_grad']:.3f} s",
        ]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scale", nargs="?", default="small", choices=models.SCALES)
    ap.add_argument("--models", nargs="*", default=models.names(), choices=models.names())
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "reports"), help="output folder")
    ap.add_argument("--no-plan-timing", action="store_true", help="skip timing GPT-2 base analysis")
    a = ap.parse_args(argv)

    import transformers

    entries: list[dict] = []
    for name in a.models:
        entries.extend(run_model(name, a.scale, a.bits))
    timing = None
    if not a.no_plan_timing:
        timing = time_plan()
        print(f"GPT-2 base analysis (plan): {timing['plan_seconds']} s; "
              f"optimize {timing['optimize_seconds']} s", flush=True)
    meta = {
        "scale": a.scale, "bits": a.bits, "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "real_models.json").write_text(
        json.dumps({"meta": meta, "results": entries, "gpt2_base_analysis": timing}, indent=2) + "\n")
    write_markdown(out / "real_models.md", entries, timing, meta)
    print(f"wrote {out / 'real_models.md'} and {out / 'real_models.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
