"""The project's one memory metric: bytes of distinct storages saved for backward during
one training step, parameters excluded. Works for eager and compiled models alike, since
saved_tensors_hooks also fire for compiled training steps.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor


@dataclass
class SavedTensors:
    """What one forward pass saved for backward, keyed by storage (views counted once)."""

    excluded: set[int] = field(default_factory=set)
    storages: dict[int, int] = field(default_factory=dict)  # data_ptr -> nbytes
    dtypes: dict[int, torch.dtype] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.excluded and storage.nbytes() > 0:
            self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
            self.dtypes[ptr] = t.dtype
        return t


def _storage_ptrs(tensors: Iterable[Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(step: Callable[[], Tensor], exclude: Iterable[Tensor] = ()) -> SavedTensors:
    """Run `step()` (a forward that returns a loss) and record what autograd saves.

    `exclude` are tensors whose storages never count (pass the model's parameters).
    The loss is returned in `.loss`; call `.loss.backward()` to finish the step.
    """
    record = SavedTensors(excluded=_storage_ptrs(exclude))
    with torch.autograd.graph.saved_tensors_hooks(record.pack, lambda t: t):
        record.loss = step()
    return record


def training_step_saved_bytes(model: torch.nn.Module, loss_fn: Callable[[], Tensor]) -> int:
    """Saved bytes of one forward+backward of `loss_fn`, excluding `model`'s parameters
    and buffers. Runs the backward so the step is complete (gradients accumulate)."""
    record = saved_bytes(loss_fn, exclude=list(model.parameters()) + list(model.buffers()))
    record.loss.backward()
    return record.bytes


@dataclass
class AllocatedPeak:
    """Peak of live tensor bytes during a step, as the CPU allocator saw it."""

    bytes: int        # of tensors allocated in the step (earlier ones and their frees not counted)
    where: str        # "forward: <op>" or "backward: <autograd node>"


def allocated_peak(step: Callable[[], None]) -> AllocatedPeak:
    """Run `step()` under the profiler's memory timeline and return its peak.

    This counts tensor allocations (like torch.cuda.max_memory_allocated on GPU), not the
    process's resident memory, so it is exact and repeatable on CPU and names the op that
    was running at the peak.
    """
    import gc

    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action, MemoryProfileTimeline

    # Garbage from earlier steps (reference cycles, as checkpointing makes) would otherwise
    # be freed whenever the collector happens to run inside the step.
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:
            step()
    finally:
        gc.enable()
    live = peak = 0
    peak_t = 0
    created = set()
    for t, action, (key, _), nbytes in MemoryProfileTimeline(prof._memory_profile()).timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            created.add(key)
            live += nbytes
        elif action == Action.DESTROY and key in created:  # what was live before is the baseline
            live -= nbytes
        if live > peak:
            peak, peak_t = live, t
    return AllocatedPeak(peak, _op_at(prof, peak_t))


def _op_at(prof, t_ns: int) -> str:
    """The innermost op running at t_ns, and whether it ran in backward."""
    spans = [(e.end_ns() - e.start_ns(), e.name()) for e in prof.profiler.kineto_results.events()
             if e.start_ns() <= t_ns <= e.end_ns()]
    node = [name for _, name in sorted(spans) if name.startswith("autograd::engine::evaluate_function")]
    if node:
        return "backward: " + node[0].rsplit(":", 1)[-1].strip()
    ops = [name for _, name in sorted(spans) if name.startswith("aten::")]
    return "forward: " + (ops[0] if ops else "?")
