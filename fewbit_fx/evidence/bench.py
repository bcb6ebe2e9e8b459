"""Evidence: `python -m fewbit_fx bench [--scale quick|full]` regenerates reports/.

Per model, against what a user would pick instead, in one process:
- eager baselines: plain eager, optimize(mode="exact"), optimize(mode="auto"),
  optimize(mode="exact", norms=True) (LayerNorm/RMSNorm inverted too),
  torch.utils.checkpoint per block (Hugging Face gradient checkpointing);
- compile baselines: torch.compile default, backend="fewbit", backend(norms=True), and torch.compile with
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
import subprocess
import sys
import time
from pathlib import Path

import torch

from fewbit_fx.evidence import models
from fewbit_fx.evidence.budget import budget_alone
from fewbit_fx.evidence.process_peak import peak_of_step as _peak, run_step as _step
from fewbit_fx.measure import measure_step, scalar_loss

SCALES = {"quick": ("tiny", 3), "full": ("small", 7)}  # model scale, timed repeats
MODELS = ("gpt2", "bert", "llama", "vit")


def variants(name: str, model, args, kwargs):
    """(baseline, mode, model) for every configuration measured."""
    import fewbit_fx

    out = [("eager", "eager", model)]
    for mode in ("exact", "auto"):
        out.append(("eager", f"optimize-{mode}", fewbit_fx.optimize(
            copy.deepcopy(model), example_inputs=args, example_kwargs=kwargs, mode=mode)))
    out.append(("eager", "optimize-exact+norms", fewbit_fx.optimize(
        copy.deepcopy(model), example_inputs=args, example_kwargs=kwargs, mode="exact", norms=True)))
    if getattr(model, "supports_gradient_checkpointing", False):
        ckpt = copy.deepcopy(model)
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out.append(("eager", "checkpoint", ckpt))
    with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
        out.append(("compile", "compile", torch.compile(copy.deepcopy(model))))
        out.append(("compile", "fewbit-backend", torch.compile(copy.deepcopy(model), backend="fewbit")))
        out.append(("compile", "fewbit-backend+norms", torch.compile(
            copy.deepcopy(model), backend=fewbit_fx.backend(norms=True))))
        out.append(("compile", "budget-0.9", torch.compile(copy.deepcopy(model), backend=budget_alone(0.9))))
    return out


def bench_model(name: str, scale: str, repeats: int, device: str,
                parts: tuple[str, ...] = ("memory", "speed")) -> tuple[list, list]:
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
    memory, speed = [], []
    if "memory" in parts:
        saved = {mode: measure_step(m, args, kwargs) for _, mode, m in configs}
        peak = {mode: _peak(m, args, kwargs, device) for _, mode, m in configs}
        memory = [{"model": name, "baseline": base, "mode": mode,
                   "saved_bytes_before": saved[base], "saved_bytes_after": saved[mode],
                   "peak_bytes_before": peak[base], "peak_bytes_after": peak[mode]}
                  for base, mode, _ in configs if mode not in ("eager", "compile")]
    if "speed" in parts:
        speed = _speed(name, configs, args, kwargs, repeats, device, warm)
    return memory, speed


def _speed(name, configs, args, kwargs, repeats: int, device: str, warm: dict) -> list[dict]:
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
    return [{"model": name, "baseline": base, "mode": mode, "device": device,
             "step_s_before": statistics.median(times[base]),
             "step_s_after": statistics.median(times[mode]),
             "ratio": statistics.median(times[mode]) / statistics.median(times[base]),
             "first_call_s_before": warm[base], "first_call_s_after": warm[mode]}
            for base, mode, _ in configs if mode not in ("eager", "compile")]


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


def _drop_ratio(row: dict) -> str:
    saved = row["saved_bytes_before"] - row["saved_bytes_after"]
    peak = row["peak_bytes_before"] - row["peak_bytes_after"]
    return f"{100 * peak / saved:.0f}%" if saved > 0 else "–"


def write_reports(out: Path, summary: dict) -> None:
    from tabulate import tabulate

    # The memory and speed parts run in separate processes: an empty part keeps the other's rows.
    from fewbit_fx.evidence import summary as summary_file

    merged = summary_file.update(out, {k: v for k, v in summary.items() if v or k not in ("memory", "speed")})
    for part in ("memory", "speed"):
        merged.setdefault(part, [])
    summary = merged
    mib = lambda b: f"{b / 2**20:.2f}"
    pct = lambda a, b: f"{100 * (a - b) / b:+.1f}%" if b else "n/a"
    mem = tabulate(
        [(r["model"], r["baseline"], r["mode"], mib(r["saved_bytes_before"]), mib(r["saved_bytes_after"]),
          pct(r["saved_bytes_after"], r["saved_bytes_before"]), mib(r["peak_bytes_before"]),
          mib(r["peak_bytes_after"]), pct(r["peak_bytes_after"], r["peak_bytes_before"]),
          _drop_ratio(r))
         for r in summary["memory"]],
        headers=["model", "baseline", "mode", "saved MiB before", "after", "change",
                 "peak MiB before", "after", "change", "peak drop / saved drop"], tablefmt="github")
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
torch.cuda.max_memory_allocated above the memory allocated before the step. On CPU the
section runs with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the resident set;
peak figures still include allocator effects (gradients, workspace) and read 0 when every
tensor is smaller than that threshold (tiny scale). The saved bytes are exact.
`eager` rows compare to plain eager, `compile` rows to torch.compile's default.
"peak drop / saved drop" compares the two reductions in bytes (the issue's goal for the
fewbit backend: at least 90%).

{mem}

## Speed

Median step time over {summary['repeats']} interleaved repeats after a warm-up step, in one
process (not the memory section's: its allocator setting costs page faults); "first call"
includes compilation (for the eager `optimize` rows: the analysis ran before, but the
first use of each compiled CPU kernel builds it, unless Inductor's disk cache has it).
Timing on a shared 2-core machine is noisy.

{spd}
"""
    (out / "benchmarks.md").write_text(text)


def memory_and_speed(argv: list[str] | None = None) -> int:
    """The memory/speed section alone (models x baselines)."""
    p = argparse.ArgumentParser(prog="fewbit-fx bench memory")
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--out", default="reports")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--parts", nargs="+", choices=["memory", "speed"], default=["memory", "speed"])
    a = p.parse_args(argv)
    model_scale, repeats = SCALES[a.scale]
    summary = {"scale": a.scale, "model_scale": model_scale, "repeats": repeats,
               "environment": environment(a.device), "memory": [], "speed": []}
    for name in a.models:
        t = time.perf_counter()
        memory, speed = bench_model(name, model_scale, repeats, a.device, tuple(a.parts))
        summary["memory"] += memory
        summary["speed"] += speed
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    write_reports(Path(a.out), summary)
    print(f"wrote {a.out}/summary.json and {a.out}/benchmarks.md")
    return 0


def _sections(scale: str, out: str) -> list[tuple[str, str, list[str], str | None]]:
    """(name, what, command, file its stdout goes to) for every report section."""
    py = [sys.executable]
    quick = scale == "quick"
    model_scale = SCALES[scale][0]
    return [
        ("memory", "saved bytes and peak memory vs eager, optimize, checkpointing, compile, budget 0.9",
         py + ["-m", "fewbit_fx", "bench", "memory", "--scale", scale, "--out", out, "--parts", "memory"], None),
        ("speed", "step time, the same configurations (without the allocator setting of memory)",
         py + ["-m", "fewbit_fx", "bench", "memory", "--scale", scale, "--out", out, "--parts", "speed"], None),
        ("tables", "few-bit table error per activation and bits, and fitting time",
         py + ["-m", "fewbit_fx.evidence.tables_timing"], "tables.txt"),
        ("tables-plot", "plot of few-bit derivative error against bits",
         py + ["-m", "fewbit_fx", "bench", "tables-plot", "--out", out], None),
        ("inverse", "inverted derivative error against the method's floor, per dtype",
         py + ["-m", "fewbit_fx.evidence.inverse_floor"] + (["--n", "200000", "--elements", "1048576"] if quick else []),
         "inverse_floor.txt"),
        ("ops", "op micro-benchmark (ns/element, ratio to the plain activation)",
         py + ["-m", "fewbit_fx", "bench-ops", "--json", f"{out}/ops.json"], "ops.txt"),
        ("real-models", "per-model report: estimated vs measured saved bytes, all modes",
         py + ["-m", "fewbit_fx.evidence.real_models", model_scale, "--out", out]
         + (["--no-plan-timing"] if quick else []), None),
        ("stacks", "optimize() on users' stacks (PEFT, checkpointing, accelerate, decorated forwards): saved bytes, exact-mode gradient error",
         py + ["-m", "fewbit_fx.evidence.stacks", "--out", out], None),
        ("peak", "where a step peaks and how much of the saved-bytes reduction reaches the peak, by depth",
         py + ["-m", "fewbit_fx", "bench", "peak", "--scale", model_scale, "--out", out], None),
        ("compiled", "per-site saved bytes under torch.compile default vs the fewbit backend",
         py + ["-m", "fewbit_fx", "bench", "compiled", "--scale", model_scale, "--out", out], None),
        ("budget", "the fewbit backend with torch.compile's activation memory budget, per b, "
         "against the budget alone; LoRA fine-tuning under compile",
         py + ["-m", "fewbit_fx", "bench", "budget", "--scale", model_scale, "--out", out]
         + (["--repeats", "3"] if quick else []), None),
        ("compile-time", "compile time of the fewbit backend vs torch.compile default, cold caches",
         py + ["-m", "fewbit_fx", "bench", "compile-time", "--scale", model_scale, "--out", out]
         + (["--repeats", "1", "--models", "gpt2", "bert"] if quick else []), None),
        ("anchors", "published figures (few-bit, inverted activations) next to ours, base-size models",
         py + ["-m", "fewbit_fx", "bench", "anchors", "--out", out]
         + (["--readme", str(_ROOT / "README.md")] if Path(out).resolve() == _ROOT / "reports" else []), None),
        ("convergence", "training loss per variant (exact, inverted, few-bit 1-4), 3 seeds, "
         "byte-level GPT on Python's stdlib sources; adapter fine-tune with frozen base",
         py + ["-m", "fewbit_fx.evidence.convergence", "--scale", scale, "--out", out], None),
    ]


_ROOT = Path(__file__).resolve().parents[2]  # the repository, for an editable install


def compiled_sites(argv: list[str] | None = None) -> int:
    """Per-site compiled report (issue: the backend's saved set) for the HF models."""
    import fewbit_fx

    p = argparse.ArgumentParser(prog="fewbit-fx bench compiled")
    p.add_argument("--scale", default="tiny")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--out", default="reports")
    a = p.parse_args(argv)
    parts = [f"# Per-site saved bytes under torch.compile\n\nGenerated by `python -m fewbit_fx "
             f"bench` (section compiled, model scale `{a.scale}`). 'before' = torch.compile "
             "default, 'after' = backend=\"fewbit\" (auto, 3 bits), both read from the "
             "partitioned graphs; the measured line is a whole warm compiled training step.\n"]
    for name in a.models:
        model, args, kwargs = models.build(name, a.scale)
        rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, compiled=True)
        parts.append(f"## {name}\n\n```\n{rep}\n```\n")
        print(f"{name}: measured {rep.measured_before} -> {rep.measured_after} B", flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "compiled.md").write_text("\n".join(parts))
    return 0


def table_error_plot(argv: list[str] | None = None) -> int:
    """PNG: few-bit relative RMSE of f' against bits, per activation (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewbit_fx import activations
    from fewbit_fx.tables import all_tables

    p = argparse.ArgumentParser(prog="fewbit-fx bench tables-plot")
    p.add_argument("--out", default="reports")
    a = p.parse_args(argv)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in ("gelu", "silu", "mish", "sigmoid", "tanh", "softplus", "elu", "hardswish", "softsign"):
        tables = all_tables(activations.get(name))
        bits = sorted(tables)
        ax.semilogy(bits, [max(tables[b].rel_rmse, 1e-12) for b in bits], marker="o", label=name)
    ax.set_xlabel("bits per element")
    ax.set_ylabel("relative RMSE of f' under N(0, 1)")
    ax.set_title("Few-bit backward: optimal piecewise-constant derivative")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=3, fontsize=8)
    fig.tight_layout()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(a.out) / "fewbit_error.png", dpi=100)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Regenerate reports/: every section, each in its own process, then the index."""
    argv = list(argv or [])
    from fewbit_fx.evidence import anchors, budget, compile_time, peak

    sub = {"memory": memory_and_speed, "compiled": compiled_sites, "tables-plot": table_error_plot,
           "compile-time": compile_time.main, "anchors": anchors.main, "peak": peak.main,
           "budget": budget.main}
    if argv and argv[0] in sub:
        return sub[argv[0]](argv[1:])
    p = argparse.ArgumentParser(prog="fewbit-fx bench", description=__doc__)
    p.add_argument("--scale", choices=sorted(SCALES), default="quick")
    p.add_argument("--out", default="reports")
    p.add_argument("--only", nargs="*", help="section names to run (default: all)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ran = []
    for name, what, cmd, stdout_file in _sections(a.scale, a.out):
        if a.only and name not in a.only:
            continue
        t = time.perf_counter()
        # A fixed mmap threshold makes glibc return every tensor-sized block to the OS when
        # it is freed, so the process's peak RSS follows live tensor memory (glibc's dynamic
        # threshold otherwise climbs to 32 MiB and keeps freed tensors resident).
        # Only for the memory section: an mmap per large tensor costs page faults, which
        # slowed steps with many temporaries (GPT-2's formula GELU) by up to 1.4x.
        peaks = name in ("memory", "anchors")
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if peaks else None
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        took = time.perf_counter() - t
        if stdout_file:
            (out / stdout_file).write_text(
                f"# {what}\n# generated by: python -m fewbit_fx bench --scale {a.scale} "
                f"(section {name}), {took:.0f} s\n\n{res.stdout}")
        status = "ok" if res.returncode == 0 else f"FAILED (exit {res.returncode})"
        print(f"[{name}] {status} in {took:.0f} s", flush=True)
        if res.returncode != 0:
            print(res.stdout[-2000:], res.stderr[-4000:], sep="\n")
        ran.append((name, what, status, took))
    done = {r[0] for r in ran}
    kept = [(name, what, "kept from an earlier run", 0.0) for name, what, _, _ in _sections(a.scale, a.out)
            if name not in done and all((out / f).exists() for f in _FILES[name])]
    write_index(out, a.scale, ran + kept)
    return 0 if all(r[2] == "ok" for r in ran) else 1


_FILES = {
    "memory": ["benchmarks.md", "summary.json"], "speed": ["benchmarks.md", "summary.json"],
    "tables": ["tables.txt"],
    "tables-plot": ["fewbit_error.png"],
    "inverse": ["inverse_floor.txt"], "ops": ["ops.txt", "ops.json"],
    "real-models": ["real_models.md", "real_models.json"], "compiled": ["compiled.md"],
    "compile-time": ["compile_time.md"], "anchors": ["anchors.md"], "peak": ["peak.md"],
    "budget": ["compile_budget.md", "compile_budget.json"], "stacks": ["stacks.md"],
    "convergence": ["convergence.md", "convergence.png", "convergence_runs.json"],
}


def write_index(out: Path, scale: str, ran: list) -> None:
    """reports/README.md: what each file holds, how it was made, on what machine."""
    env = environment("cuda" if torch.cuda.is_available() else "cpu")
    rows = "\n".join(
        f"| {name} | {what} | {', '.join(f'[{f}]({f})' for f in _FILES[name])} | "
        f"{status}{f', {took:.0f} s' if took else ''} |"
        for name, what, status, took in ran)
    text = f"""# fewbit-fx evidence

Everything here is generated by one command; no figure is typed by hand:

    python -m fewbit_fx bench --scale quick|full   # quick: tiny models; full: small models
    python -m fewbit_fx bench --only SECTION ...    # one section; the others are kept

Each file names the command and scale that produced it (this index was last written by a
`--scale {scale}` run).

Last run: {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, environment {json.dumps(env)}.

| section | what | files | last run |
|---|---|---|---|
{rows}

How things are measured:
- **Saved bytes**: bytes of distinct storages saved for backward during one training step,
  parameters and buffers excluded, via `torch.autograd.graph.saved_tensors_hooks` (eager and
  compiled alike). The per-site estimate comes from the static saves analysis; the
  "measured" figures from a real step.
- **Peak memory**: CPU process peak RSS during the step (VmHWM reset via
  /proc/self/clear_refs) above the resident memory before it; on GPU
  `torch.cuda.max_memory_allocated`. `peak.md` also counts live tensor bytes through the
  profiler's allocator timeline (exact and repeatable on CPU) and names the op at the peak.
- **Speed**: median over interleaved repeats in one process after a warm-up step. The
  machine is a shared 2-core CPU box: treat ratios within ~10% as noise.
- **Gradient fidelity**: `tables.txt` (few-bit relative RMSE of f' under N(0,1), per bits),
  `inverse_floor.txt` (inverted f' error against the floor of an exact float64 inverse of the
  rounded output, per dtype), and `real_models.*` (relative error of all parameter
  gradients of one step against the unchanged model, per model and mode; few-bit tables
  fitted to the example inputs, optimize()'s default).

Not measured yet: GPU figures (no GPU was available to the sessions that made these).
`compile_budget_base/` is the budget section at base scale (`python -m fewbit_fx bench budget
--scale base --out reports/compile_budget_base`, about 10 minutes per model on this machine).
The convergence section at `--scale quick` trains for only 150 steps; `--scale full` trains
3000 steps per run (33 runs in parallel worker processes, about 25 minutes on this 2-core
machine). `python -m fewbit_fx.evidence.convergence --scale full` refreshes it alone.
Three other full runs are kept for comparison. With the N(0, 1) few-bit tables
(`--tables normal`): `convergence_normal_tables/` (same setup as `convergence.md`; 5 of 12
adapter few-bit runs diverged) and `convergence_adapter_lr0.003/` (the adapter task at
learning rate 3e-3, to tell divergence from a learning-rate effect). With tables fitted
once on the first batch and never refitted (`--tables fitted-once`):
`convergence_fitted_once/` (adapters as good as `convergence.md`; pretraining from scratch
up to 9% worse, because a table fitted at initialisation goes stale). Each file names the
command that reproduces it.
"""
    (out / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
