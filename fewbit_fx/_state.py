"""Run a model for analysis or measurement without leaving a trace on it."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Restore buffers (BatchNorm statistics, counters) and the RNG afterwards, so an
    extra analysis forward changes neither the model nor the user's random stream."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name in buffers and buf.shape == buffers[name].shape:
                        buf.copy_(buffers[name])
