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
