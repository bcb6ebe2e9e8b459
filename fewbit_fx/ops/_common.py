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
