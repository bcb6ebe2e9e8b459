"""Evidence: `python -m fewbit_fx bench [--scale quick|full]` regenerates reports/.

Per model, against what a user would pick instead, in one process:
- eager baselines: plain eager, optimize(mode="exact"), optimize(mode="auto"),
  torch.utils.checkpoint per block (Hugging Face gradient checkpointing);
- compile baselines: torch.compile default, backend="fewbit", and torch.compile with
  torch._functorch.config.activation_memory_budget = 0.9.
Memory is bytes of distinct storages saved for backward in one training step (parameters
excluded; saved_tensors_hooks) and peak memory (CPU: the process's peak RSS during the step,
reset through /proc/self/clear_refs; GPU: torch.cuda.max_memory_allocated). Speed is the
median step time over interleaved repeats, as a ratio to the baseline.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from fewbit_fx import models
from fewbit_fx.api import scalar_loss
from fewbit_fx.measure import saved_bytes

SCALES = {"quick": ("tiny", 3), "full": ("small", 7)}  # model scale, timed repeats
MODELS = ("gpt2", "bert", "llama", "vit")


def _step(model, args, kwargs):
    loss = scalar_loss(model(*args, **kwargs))
    loss.backward()
    return loss


def _saved(model, args, kwargs) -> int:
    rec = saved_bytes(lambda: scalar_loss(model(*args, **kwargs)),
                      exclude=list(model.parameters()) + list(model.buffers()))
    rec.loss.backward()
    model.zero_grad(set_to_none=True)
    return rec.bytes


def _peak(model, args, kwargs, device: str) -> int:
    """Peak memory of one step above what was resident before it."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        _step(model, args, kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        start = _rss("VmRSS")
        _reset_peak_rss()
        _step(model, args, kwargs)
        peak = _rss("VmHWM") - start
    model.zero_grad(set_to_none=True)
    return peak


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _budget_backend(budget: float):
    from torch._inductor.compile_fx import compile_fx

    def inductor_with_budget(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)

    return inductor_with_budget


def variants(name: str, model, args, kwargs):
    """(baseline, mode, model) for every configuration measured."""
    import fewbit_fx

    out = [("eager", "eager", model)]
    for mode in ("exact", "auto"):
        out.append(("eager", f"optimize-{mode}", fewbit_fx.optimize(
            copy.deepcopy(model), example_inputs=args, example_kwargs=kwargs, mode=mode)))
    if getattr(model, "supports_gradient_checkpointing", False):
        ckpt = copy.deepcopy(model)
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out.append(("eager", "checkpoint", ckpt))
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
        out.append(("compile", "compile", torch.compile(copy.deepcopy(model))))
        out.append(("compile", "fewbit-backend", torch.compile(copy.deepcopy(model), backend="fewbit")))
        out.append(("compile", "budget-0.9", torch.compile(copy.deepcopy(model), backend=_budget_backend(0.9))))
    return out


def bench_model(name: str, scale: str, repeats: int, device: str) -> tuple[list, list]:
    torch.manual_seed(0)
    model, args, kwargs = models.build(name, scale)
    model.to(device)
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    configs = variants(name, model, args, kwargs)
    warm = {}
    for base, mode, m in configs:  # warm-up (compiles) and memory, one at a time
        t = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            _step(m, args, kwargs)
        warm[mode] = time.perf_counter() - t
        m.zero_grad(set_to_none=True)
    saved = {mode: _saved(m, args, kwargs) for _, mode, m in configs}
    peak = {mode: _peak(m, args, kwargs, device) for _, mode, m in configs}
    times = {mode: [] for _, mode, _ in configs}
    for _ in range(repeats):  # interleaved
        for _, mode, m in configs:
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            _step(m, args, kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - t)
            m.zero_grad(set_to_none=True)
    memory, speed = [], []
    for base, mode, _ in configs:
        if mode in ("eager", "compile"):
            continue
        memory.append({"model": name, "baseline": base, "mode": mode,
                       "saved_bytes_before": saved[base], "saved_bytes_after": saved[mode],
                       "peak_bytes_before": peak[base], "peak_bytes_after": peak[mode]})
        speed.append({"model": name, "baseline": base, "mode": mode, "device": device,
                      "step_s_before": statistics.median(times[base]),
                      "step_s_after": statistics.median(times[mode]),
                      "ratio": statistics.median(times[mode]) / statistics.median(times[base]),
                      "first_call_s_before": warm[base], "first_call_s_after": warm[mode]})
    return memory, speed


def environment(device: str) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpus": os.cpu_count(), "device": device}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_reports(out: Path, summary: dict) -> None:
    from tabulate import tabulate

    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    mib = lambda b: f"{b / 2**20:.2f}"
    pct = lambda a, b: f"{100 * (a - b) / b:+.1f}%" if b else "n/a"
    mem = tabulate(
        [(r["model"], r["baseline"], r["mode"], mib(r["saved_bytes_before"]), mib(r["saved_bytes_after"]),
          pct(r["saved_bytes_after"], r["saved_bytes_before"]), mib(r["peak_bytes_before"]),
          mib(r["peak_bytes_after"]), pct(r["peak_bytes_after"], r["peak_bytes_before"]))
         for r in summary["memory"]],
        headers=["model", "baseline", "mode", "saved MiB before", "after", "change",
                 "peak MiB before", "after", "change"], tablefmt="github")
    spd = tabulate(
        [(r["model"], r["baseline"], r["mode"], f"{1e3 * r['step_s_before']:.1f}",
          f"{1e3 * r['step_s_after']:.1f}", f"{r['ratio']:.3f}",
          f"{r['first_call_s_before']:.1f}", f"{r['first_call_s_after']:.1f}")
         for r in summary["speed"]],
        headers=["model", "baseline", "mode", "step ms before", "after", "ratio",
                 "first call s before", "after"], tablefmt="github")
    env = summary["environment"]
    text = f"""# Benchmarks: memory and speed

Generated by `python -m fewbit_fx bench --scale {summary['scale']}`; do not edit by hand.
Environment: {json.dumps(env)}.

Models are built from configs with random weights (`fewbit_fx.models`, scale
`{summary['model_scale']}`), in training mode, one training step = forward, a scalar loss
(mean of squares of the floating outputs) and backward.

## Memory

"saved" = bytes of distinct storages saved for backward during one step, parameters and
buffers excluded (torch.autograd.graph.saved_tensors_hooks; fires for compiled steps too).
"peak" = on CPU, the process's peak resident memory during the step above the resident
memory before it (VmHWM after resetting it through /proc/self/clear_refs); on GPU,
torch.cuda.max_memory_allocated above the memory allocated before the step. CPU peak
figures include allocator effects and are noisy at tiny scale; the saved bytes are exact.
`eager` rows compare to plain eager, `compile` rows to torch.compile's default.

{mem}

## Speed

Median step time over {summary['repeats']} interleaved repeats after a warm-up step, in one
process; "first call" includes compilation (for the eager `optimize` rows it is a plain
step, the analysis ran before). Timing on a shared 2-core machine is noisy.

{spd}
"""
    (out / "benchmarks.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewbit-fx bench", description=__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--out", default="reports")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    model_scale, repeats = SCALES[a.scale]
    summary = {"scale": a.scale, "model_scale": model_scale, "repeats": repeats,
               "environment": environment(a.device), "memory": [], "speed": []}
    for name in a.models:
        t = time.perf_counter()
        memory, speed = bench_model(name, model_scale, repeats, a.device)
        summary["memory"] += memory
        summary["speed"] += speed
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    write_reports(Path(a.out), summary)
    print(f"wrote {a.out}/summary.json and {a.out}/benchmarks.md")
    return 0
