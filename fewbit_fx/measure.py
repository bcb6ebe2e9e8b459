"""The project's one memory metric: bytes of distinct storages saved for backward during
one training step, parameters excluded. Works for eager and compiled models alike, since
saved_tensors_hooks also fire for compiled training steps. Also the step's peak, and the
loss any model output gives (the steps report() measures).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from fewbit_fx._state import preserved_state


@dataclass
class SavedTensors:
    """What one forward pass saved for backward, keyed by storage (views counted once)."""

    excluded: set[int] = field(default_factory=set)
    storages: dict[int, int] = field(default_factory=dict)  # data_ptr -> nbytes

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.excluded and storage.nbytes() > 0:
            self.storages[ptr] = max(self.storages.get(ptr, 0), storage.nbytes())
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


def measure_step(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Saved bytes of one forward+backward (parameters and buffers excluded), no side effects.

    A plain backward() runs the step (torch.autograd.grad is refused by reentrant
    checkpointing); the gradients it leaves are put back as they were.
    """
    with preserved_state(model), torch.enable_grad(), _gradients_restored(model, args, kwargs):
        record = saved_bytes(lambda: scalar_loss(model(*args, **kwargs)),
                             exclude=list(model.parameters()) + list(model.buffers()))
        if record.loss.requires_grad:
            record.loss.backward()
    return record.bytes


def measure_peak(model: nn.Module, args: tuple, kwargs: dict) -> int:
    """Most bytes of tensors allocated during one forward+backward that are live at once
    (CUDA: torch.cuda.max_memory_allocated above the start; CPU: the profiler's allocator
    timeline), after a warm-up step; no side effects."""
    def step():
        loss = scalar_loss(model(*args, **kwargs))
        if loss.requires_grad:
            loss.backward()

    with preserved_state(model), torch.enable_grad(), _gradients_restored(model, args, kwargs):
        step()  # warm-up: first-call allocations and kernel builds stay out of the figure
        for t in _grad_leaves(model, args, kwargs):
            t.grad = None
        cuda = next((t.device for t in model.parameters() if t.is_cuda), None)
        if cuda is None:
            return allocated_peak(step).bytes
        torch.cuda.synchronize(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        base = torch.cuda.memory_allocated(cuda)
        step()
        torch.cuda.synchronize(cuda)
        return torch.cuda.max_memory_allocated(cuda) - base


def _grad_leaves(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors a step's backward() leaves gradients on: parameters and inputs."""
    return [t for t in [*model.parameters(), *args, *kwargs.values()]
            if isinstance(t, torch.Tensor) and t.requires_grad]


@contextlib.contextmanager
def _gradients_restored(model: nn.Module, args: tuple, kwargs: dict):
    leaves = _grad_leaves(model, args, kwargs)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    try:
        yield
    finally:
        for t, g in zip(leaves, grads):
            t.grad = g


def float_tensors(output) -> list[torch.Tensor]:
    """The floating-point tensors in any model output (tensor, tuple, dict, HF ModelOutput)."""
    found: list[torch.Tensor] = []

    def collect(o):
        if isinstance(o, torch.Tensor):
            if o.is_floating_point():
                found.append(o)
        elif isinstance(o, dict) or hasattr(o, "to_tuple"):
            for v in (o.values() if isinstance(o, dict) else o.to_tuple()):
                collect(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                collect(v)

    collect(output)
    return found


def scalar_loss(output) -> torch.Tensor:
    """A scalar from any model output: the mean square of each floating-point tensor, summed
    (squares, so no gradient is trivially constant)."""
    tensors = float_tensors(output)
    if not tensors:
        raise ValueError("the model output holds no floating-point tensor to take a loss of")
    return sum((t.float() ** 2).mean() for t in tensors)
