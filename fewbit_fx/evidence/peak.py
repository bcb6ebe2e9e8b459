"""How much of the saved-bytes reduction reaches a step's peak, and why not all of it.

Peak = live tensor bytes counted by the profiler's memory timeline (the CPU analogue of
torch.cuda.max_memory_allocated: exact and repeatable, unlike resident memory), above
what was live before the step. The same models at their benchmark depth and deepened to
12 blocks (copies of their own blocks), one eager step each, original and optimize().
Inverted activations keep about (blocks - 1) / blocks of their saving at the peak; the
report (render) says why.

    python -m fewbit_fx bench peak [--out reports]
"""
from __future__ import annotations

import argparse
import copy
from pathlib import Path

from tabulate import tabulate
from torch import nn

from fewbit_fx.evidence import models
from fewbit_fx.measure import scalar_loss
from fewbit_fx.measure import allocated_peak, measure_step

MODELS = ("bert", "gpt2", "vit")
CHECKPOINTED_MODELS = ("bert", "gpt2", "vit", "llama")
DEEP = 12
MODES = ("auto", "fewbit")


def blocks(model: nn.Module) -> nn.ModuleList:
    """The model's stack of repeated blocks: its longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of blocks")
    return max(lists, key=len)


def deepened(model: nn.Module, depth: int) -> nn.Module:
    """A copy of `model` with its block stack extended to `depth` by copying blocks."""
    out = copy.deepcopy(model)
    stack = blocks(out)
    for i in range(len(stack), depth):
        stack.append(copy.deepcopy(stack[i % len(stack)]))
    for attr in ("num_hidden_layers", "n_layer"):  # configs some models read per forward
        if hasattr(getattr(out, "config", None), attr):
            setattr(out.config, attr, len(stack))
    return out


def measure(model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, object]:
    """(saved bytes, allocated peak) of one training step, after a warm-up step."""
    def step():
        scalar_loss(model(*args, **kwargs)).backward()

    step()
    model.zero_grad(set_to_none=True)
    saved = measure_step(model, args, kwargs)
    model.zero_grad(set_to_none=True)
    peak = allocated_peak(step)
    model.zero_grad(set_to_none=True)
    return saved, peak


def rows(names=MODELS, scale: str = "small", deep: int = DEEP, modes=MODES) -> list[dict]:
    import fewbit_fx

    out = []
    for name in names:
        base, args, kwargs = models.build(name, scale)
        for depth in sorted({len(blocks(base)), deep}):
            model = deepened(base, depth)
            saved0, peak0 = measure(model, args, kwargs)
            for mode in modes:
                opt = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=args,
                                         example_kwargs=kwargs, mode=mode)
                saved1, peak1 = measure(opt, args, kwargs)
                drop = saved0 - saved1
                out.append(dict(model=name, blocks=depth, mode=mode, saved_before=saved0,
                                saved_after=saved1, peak_before=peak0.bytes, peak_after=peak1.bytes,
                                ratio=(peak0.bytes - peak1.bytes) / drop if drop > 0 else None,
                                peak_at_before=peak0.where, peak_at_after=peak1.where))
    return out


def checkpointed_rows(names=MODELS, scale: str = "small", modes=MODES) -> list[dict]:
    """The models at their own depth with Hugging Face gradient checkpointing on: nothing
    is saved across the step inside a layer, so what a rewrite can change is the peak
    while backward recomputes one layer."""
    import fewbit_fx
    from fewbit_fx.measure import measure_peak

    out = []
    for name in names:
        model, args, kwargs = models.build(name, scale)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        before = measure_peak(model, args, kwargs)
        for mode in modes:
            opt = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=args,
                                     example_kwargs=kwargs, mode=mode)
            out.append(dict(model=name, blocks=len(blocks(model)), mode=mode, peak_before=before,
                            peak_after=measure_peak(opt, args, kwargs)))
    return out


def render(results: list[dict], scale: str, checkpointed: list[dict] = ()) -> str:
    mib = 2.0**20
    table = [[r["model"], r["blocks"], r["mode"], f"{r['saved_before'] / mib:.2f}",
              f"{r['saved_after'] / mib:.2f}", f"{r['peak_before'] / mib:.2f}",
              f"{r['peak_after'] / mib:.2f}",
              "–" if r["ratio"] is None else f"{r['ratio']:.0%}",
              r["peak_at_before"], r["peak_at_after"]] for r in results]
    head = ["model", "blocks", "mode", "saved MiB before", "after", "peak MiB before", "after",
            "peak drop / saved drop", "eager peaks in", "optimized peaks in"]
    return f"""# Where a step peaks, and how much of the saving reaches the peak

Generated by `python -m fewbit_fx bench peak` (scale {scale}); do not edit by hand.
"peak" is the most tensor memory allocated during one training step and live at once (the
profiler's allocator timeline on CPU, the counterpart of `torch.cuda.max_memory_allocated`);
"saved" the bytes saved for backward. "blocks" is the model's depth: its benchmark depth,
and {DEEP} (its own blocks copied). "... peaks in" names the op running at the peak.

{tabulate(table, head, tablefmt="github")}

Why the inverted ratio grows with depth: the step peaks early in backward, right after the
last block's output projection has run its backward. Eager autograd has just freed that
projection's input (the activation output), but an inverted activation still holds the
same tensor for its own backward, so the last block's saving is not realised yet at the
peak: about (blocks - 1) / blocks of the saving reaches it. Few-bit variants share nothing
with their neighbours, so nearly all of their (slightly smaller) saving reaches the peak.
A model that peaks before any activation's backward (GPT-2 here, at the loss over its
logits) keeps all of it.
{_render_checkpointed(checkpointed)}"""


def _render_checkpointed(results) -> str:
    if not results:
        return ""
    mib = 2.0**20
    table = [[r["model"], r["blocks"], r["mode"], f"{r['peak_before'] / mib:.2f}",
              f"{r['peak_after'] / mib:.2f}",
              f"{100 * (r['peak_after'] - r['peak_before']) / r['peak_before']:+.1f}%"]
             for r in results]
    head = ["model", "blocks", "mode", "peak MiB before", "after", "change"]
    return f"""
## With gradient checkpointing

The same models with Hugging Face's `gradient_checkpointing_enable()` (non-reentrant): a
layer saves nothing across the step, and backward recomputes one layer at a time. The
rewrite then acts on the recomputed layer only, so the peak is what can change.

{tabulate(table, head, tablefmt="github")}

A formula activation (GPT-2's tanh GELU) keeps several full-size tensors of its own, and
the rewrite removes them from the recomputed layer. A single-op activation (BERT's and
ViT's GELU) keeps one, its input. Few-bit drops it. Inverted keeps the output instead,
which the next Linear keeps too, but that Linear's backward frees it just before the
activation's own backward runs: where the layer peaks in that gap (BERT, ViT), the peak
moves rather than drops and the 1-bit mask is added; where it peaks earlier, while both
tensors are live (Llama's gated MLP, at the multiply's backward), it drops.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fewbit-fx bench peak", description=__doc__)
    p.add_argument("--scale", default="small")
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--out", default="reports")
    a = p.parse_args(argv)
    text = render(rows(a.models, a.scale), a.scale, checkpointed_rows(CHECKPOINTED_MODELS, a.scale))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "peak.md").write_text(text)
    print(text)
    return 0
