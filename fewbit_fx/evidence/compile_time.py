"""Compile time of backend="fewbit" against torch.compile's default, with cold caches.

Each measurement is a fresh process with its own empty Inductor cache directory, so
neither side reuses kernels the other compiled (in one process the second compile would
find the first one's C++ kernels). The figure is the first training step (Dynamo,
our analysis and rewrite, AOTAutograd, Inductor, C++ compilation, one step), minus a warm
step, so that only compilation counts. Runs alternate default / fewbit per repeat.

Inductor compiles serially here (compile_threads=1), so that the process's CPU time plus
its reaped children's (every gcc run) is all the compile work: on a shared machine wall
time swings by +-15% between identical runs, and CPU time also reports which part grew
(Python: tracing, lowering, codegen; C++: gcc).

    python -m fewbit_fx bench compile-time [--models gpt2 bert] [--repeats 5]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewbit_fx.evidence import models, summary
from fewbit_fx.measure import scalar_loss


def one_process(model_name: str, scale: str, backend: str) -> dict:
    """In the child: build, compile, time the first and a warm step."""
    import fewbit_fx  # noqa: F401  (registers the backend)

    torch._inductor.config.compile_threads = 1
    torch.manual_seed(0)
    model, args, kwargs = models.build(model_name, scale)
    compiled = torch.compile(model, backend=backend)

    def step():
        scalar_loss(compiled(*args, **kwargs)).backward()
        model.zero_grad(set_to_none=True)

    t, cpu = time.perf_counter(), _cpu_times()
    step()
    first = time.perf_counter() - t
    python_s, cxx_s = (after - before for after, before in zip(_cpu_times(), cpu))
    warm = []
    for _ in range(3):
        t, cpu = time.perf_counter(), _cpu_times()
        step()
        warm.append((time.perf_counter() - t, _cpu_times()[0] - cpu[0]))
    return {"first_step_s": first, "warm_step_s": statistics.median(w for w, _ in warm),
            "python_cpu_s": python_s - statistics.median(c for _, c in warm), "cxx_cpu_s": cxx_s}


def _cpu_times() -> tuple[float, float]:
    """(this process's CPU seconds, its reaped children's: the C++ compiler runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def measure(model_name: str, scale: str, backend: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="fewbit-cold-cache-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache + "/triton"}
        cmd = [sys.executable, "-m", "fewbit_fx.evidence.compile_time", "--child", model_name, scale, backend]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewbit-fx bench compile-time")
    p.add_argument("--scale", default="small", help="model scale (tiny, small, base)")
    p.add_argument("--models", nargs="*", default=["gpt2", "bert", "llama", "vit"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="reports")
    a = p.parse_args(argv)
    rows = []
    for name in a.models:
        runs = {"inductor": [], "fewbit": []}
        for _ in range(a.repeats):
            for backend in runs:
                r = measure(name, a.scale, backend)
                runs[backend].append({"wall": r["first_step_s"] - r["warm_step_s"],
                                      "python": r["python_cpu_s"], "cxx": r["cxx_cpu_s"]})
        rows.append(summarise(name, a.scale, runs["inductor"], runs["fewbit"]))
        print(f"{name}: {rows[-1]['compile_s_before']:.1f} s -> {rows[-1]['compile_s_after']:.1f} s "
              f"({rows[-1]['ratio']:.2f}x wall, {rows[-1]['cpu_ratio']:.2f}x CPU)", flush=True)
    write(Path(a.out), rows, a.repeats)
    return 0


def summarise(model: str, scale: str, before: list[dict], after: list[dict]) -> dict:
    """Medians of each side, and the median of the per-round ratios (a round's two runs are
    adjacent in time, so their ratio cancels the slow drift of a shared machine)."""
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    cpu = lambda r: r["python"] + r["cxx"]  # noqa: E731
    return {
        "model": model, "scale": scale,
        "compile_s_before": med(before, "wall"), "compile_s_after": med(after, "wall"),
        "ratio": statistics.median(a["wall"] / b["wall"] for a, b in zip(after, before)),
        "cpu_ratio": statistics.median(cpu(a) / cpu(b) for a, b in zip(after, before)),
        "python_cpu_s_before": med(before, "python"), "python_cpu_s_after": med(after, "python"),
        "cxx_cpu_s_before": med(before, "cxx"), "cxx_cpu_s_after": med(after, "cxx"),
        "runs_before": [round(r["wall"], 2) for r in before],
        "runs_after": [round(r["wall"], 2) for r in after],
    }


def write(out: Path, rows: list[dict], repeats: int) -> None:
    from tabulate import tabulate

    summary.update(out, {"compile_time": rows})
    table = tabulate(
        [(r["model"], r["scale"], f"{r['compile_s_before']:.1f}", f"{r['compile_s_after']:.1f}",
          f"{r['ratio']:.2f}", f"{r['cpu_ratio']:.2f}",
          f"{r['python_cpu_s_before']:.1f} -> {r['python_cpu_s_after']:.1f}",
          f"{r['cxx_cpu_s_before']:.1f} -> {r['cxx_cpu_s_after']:.1f}",
          " ".join(f"{v:.1f}" for v in r["runs_before"]), " ".join(f"{v:.1f}" for v in r["runs_after"]))
         for r in rows],
        headers=["model", "scale", "default s", "fewbit s", "wall ratio", "CPU ratio",
                 "Python CPU s", "gcc CPU s", "default runs s", "fewbit runs s"],
        tablefmt="github")
    (out / "compile_time.md").write_text(f"""# Compile time with cold caches

Generated by `python -m fewbit_fx bench` (section compile-time); do not edit by hand.
Each run: a fresh process with an empty Inductor cache and serial compilation
(compile_threads=1), first training step minus a warm step (so compilation only).
{repeats} rounds of default then fewbit. Times: medians; ratios: median of the per-round
ratios. CPU = the process's CPU time (Python: Dynamo, our analysis and rewrite, AOTAutograd,
Inductor's lowering and codegen) plus its children's (gcc). "default" = torch.compile(model);
"fewbit" = backend="fewbit" (auto mode, 3 bits). Machine as in benchmarks.md.

{table}
""")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(one_process(*sys.argv[2:5])))
        sys.exit(0)
    sys.exit(main(sys.argv[1:]))
