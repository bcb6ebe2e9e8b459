"""Our figures next to the published ones (the issue's anchors), on comparable configs.

The anchors are other projects' published numbers, quoted with their source; every "ours"
figure is measured here, at "base" scale (real model sizes, random weights, sequence 128,
batch 8, CPU; at batch 1 the parameters' gradients dominate the peak and hide activations):
- saved = bytes of distinct storages saved for backward in one training step
  (parameters excluded), original vs optimized; the anchors' "activation memory";
- peak = the process's peak RSS during the step above the memory before it (median of 3,
  original and optimized interleaved; allocator effects included).

Writes reports/anchors.md, summary.json["anchors"], and the table between the
`<!-- anchors -->` markers in the top-level README.md.

    python -m fewbit_fx bench anchors
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from torch import nn

from fewbit_fx.evidence import models

ANCHORS = [  # (source, their model and method, their figure, our model, our mode, adapters)
    ("fewbit library, Novikov et al. ICML 2023", "RoBERTa-base, few-bit GELU 3 bits",
     "-13.8% peak memory", "hf:roberta", "fewbit", False),
    ("inverted activations code, Novikov & Oseledets 2024", "BERT-base, inverted GELU",
     "-23.1% activation memory", "bert", "auto", False),
    ("inverted activations code, Novikov & Oseledets 2024", "Mistral-7B QLoRA, inverted SiLU",
     "-15.7% activation memory", "mistral", "auto", True),
]
README_START, README_END = "<!-- anchors:start -->", "<!-- anchors:end -->"


class LoRA(nn.Module):
    """A frozen Linear plus a trainable rank-r adapter (no 4-bit quantization)."""

    def __init__(self, base: nn.Linear, rank: int = 8) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def with_adapters(model: nn.Module) -> nn.Module:
    """QLoRA-style: every weight frozen, LoRA on every Linear inside the decoder layers."""
    model.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and ".layers." in f".{name}.":
                setattr(module, child_name, LoRA(child))
    return model


def _build(name: str, scale: str, batch: int):
    """The catalog model and its example inputs, tiled to `batch` along dim 0."""
    model, args, kwargs = models.build_hf(name[3:], scale) if name.startswith("hf:") else models.build(name, scale)
    tile = lambda t: t.repeat(batch, *[1] * (t.dim() - 1)) if isinstance(t, torch.Tensor) else t
    return model, tuple(tile(a) for a in args), {k: tile(v) for k, v in kwargs.items()}


def measure(name: str, mode: str, adapters: bool, scale: str = "base", batch: int = 8) -> dict:
    import fewbit_fx
    from fewbit_fx.measure import measure_step
    from fewbit_fx.evidence.process_peak import peak_of_step as _peak

    model, args, kwargs = _build(name, scale, batch)
    if adapters:
        model = with_adapters(model)
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=args,
                                   example_kwargs=kwargs, mode=mode, bits=3)
    saved = [measure_step(m, args, kwargs) for m in (model, optimized)]
    peaks: list[list[int]] = [[], []]
    for _ in range(3):
        for i, m in enumerate((model, optimized)):
            peaks[i].append(_peak(m, args, kwargs, "cpu"))
    peak = [statistics.median(p) for p in peaks]
    return {"model": name, "mode": mode, "adapters": adapters, "batch": batch,
            "saved_bytes_before": saved[0], "saved_bytes_after": saved[1],
            "peak_bytes_before": peak[0], "peak_bytes_after": peak[1]}


def table(rows: list[dict]) -> str:
    from tabulate import tabulate

    pct = lambda a, b: f"{100 * (a - b) / b:+.1f}%" if b else "n/a"
    return tabulate(
        [(src, what, figure,
          f"{r['model']} base{' + LoRA' if r['adapters'] else ''}, {r['mode']}",
          pct(r["saved_bytes_after"], r["saved_bytes_before"]),
          pct(r["peak_bytes_after"], r["peak_bytes_before"]))
         for (src, what, figure, *_), r in zip(ANCHORS, rows)],
        headers=["source", "their config", "their figure", "our config (CPU, seq 128, batch 8)",
                 "our saved bytes", "our peak RSS"], tablefmt="github")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewbit-fx bench anchors")
    p.add_argument("--out", default="reports")
    p.add_argument("--readme", help="a README.md whose table between the anchors markers to replace")
    a = p.parse_args(argv)
    rows = []
    for *_, name, mode, adapters in ANCHORS:
        rows.append(measure(name, mode, adapters))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary["anchors"] = rows
    path.write_text(json.dumps(summary, indent=2))
    text = table(rows)
    (out / "anchors.md").write_text(
        "# Published figures and ours\n\nGenerated by `python -m fewbit_fx bench` (section "
        "anchors); do not edit by hand. How ours are measured: `fewbit_fx/bench_anchors.py`.\n\n"
        + text + "\n")
    readme = Path(a.readme) if a.readme else None
    if readme and readme.exists() and README_START in readme.read_text():
        body = readme.read_text()
        head, rest = body.split(README_START, 1)
        tail = rest.split(README_END, 1)[1]
        readme.write_text(f"{head}{README_START}\n{text}\n{README_END}{tail}")
    return 0
