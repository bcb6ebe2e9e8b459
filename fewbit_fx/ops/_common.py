"""Pieces shared by both custom ops."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_input(x: Tensor, what: str) -> None:
    """Reject inputs the ops cannot handle with an error that names the fix."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{what} takes a floating-point tensor (float32, float64, float16, bfloat16), "
            f"got {x.dtype}; cast the input first"
        )


def compare_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types are compared and multiplied in fp32, never in their own precision."""
    return torch.promote_types(dtype, torch.float32)


def refuse_create_graph() -> None:
    """Backward runs with grad mode on exactly when create_graph=True: refuse then, since
    our backward is not differentiable (and a graph-less result would silently drop terms)."""
    if torch.is_grad_enabled():
        no_double_backward(None)


def no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fewbit_fx activations do not support double backward (create_graph=True through "
        "their backward); keep the original activation for layers that need higher-order "
        "gradients"
    )


CHUNK = 1 << 16  # elements per eager chunk; a multiple of 8 so packed bytes split evenly


def chunks(n: int):
    """(start, end) element ranges. Eager torch-op implementations (where no compiled CPU
    kernel runs, fewbit_fx.kernels.cpu) run their many small ops one chunk at a time, so
    their temporaries stay a few hundred KiB instead of dozens of full-size tensors (which
    would raise peak memory by more than the saved bytes)."""
    return ((s, min(s + CHUNK, n)) for s in range(0, n, CHUNK))


def chunkable(*tensors) -> bool:
    """Chunk only long contiguous inputs; others take the whole-tensor path (same result)."""
    return tensors[0].numel() > CHUNK and all(t.is_contiguous() for t in tensors)
