"""The process-level peak of one training step (CPU: peak RSS via /proc; CUDA:
max_memory_allocated), which is what the bench compares across configurations. (The
allocator-level peak of report() is fewbit_fx.measure.measure_peak.)"""
from __future__ import annotations

import torch

from fewbit_fx.measure import scalar_loss


def run_step(model, args, kwargs):
    loss = scalar_loss(model(*args, **kwargs))
    loss.backward()
    return loss


def peak_of_step(model, args, kwargs, device: str) -> int:
    """Peak memory of one step above what was resident before it."""
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        run_step(model, args, kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    else:
        start = _rss("VmRSS")
        _reset_peak_rss()
        run_step(model, args, kwargs)
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


