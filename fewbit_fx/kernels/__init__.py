"""Triton CUDA kernels for the fewbit_fx custom ops (one memory pass per op).

`register_cuda_kernels()` makes them the ops' CUDA implementations. It is safe to call
anywhere: it registers nothing when torch has no CUDA support, triton is not installed,
or TRITON_INTERPRET=1 is set (the interpreter is for tests on CPU tensors, far too slow
for real CUDA work). It neither imports triton nor initialises CUDA: the kernel modules
are imported on the first call with a CUDA tensor, so importing fewbit_fx stays cheap and
fork-safe. CPU tensors take the ops' CPU path (fewbit_fx.kernels.cpu: Inductor-compiled C++
kernels for long tensors, the torch implementations otherwise).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

_OPS = ("fewbit_forward", "fewbit_backward", "inverted_forward", "inverted_backward")
_registered = False
_impl = None


def _kernels():
    """The Triton launchers, or the torch implementations if triton fails to import."""
    global _impl
    if _impl is None:
        try:
            from fewbit_fx.kernels import triton_fewbit, triton_inverted

            _impl = {
                "fewbit_forward": triton_fewbit.fewbit_forward,
                "fewbit_backward": triton_fewbit.fewbit_backward,
                "inverted_forward": triton_inverted.inverted_forward,
                "inverted_backward": triton_inverted.inverted_backward,
            }
        except Exception as e:  # a broken triton install must not break training
            warnings.warn(f"fewbit_fx: Triton kernels unavailable ({e!r}); using torch ops")
            from fewbit_fx.ops import fewbit, inverted

            _impl = {
                "fewbit_forward": lambda x, act, params, borders, levels, bits: fewbit._forward(
                    x, act, params, borders, bits
                ),
                "fewbit_backward": fewbit._backward,
                "inverted_forward": inverted._forward,
                "inverted_backward": inverted._backward,
            }
    return _impl


# Signatures match the op schemas; torch calls these with the op's arguments.
def _fewbit_forward(x, act, params, borders, levels, bits):
    return _kernels()["fewbit_forward"](x, act, params, borders, levels, bits)


def _fewbit_backward(grad, packed, levels, bits):
    return _kernels()["fewbit_backward"](grad, packed, levels, bits)


def _inverted_forward(x, act, params):
    return _kernels()["inverted_forward"](x, act, params)


def _inverted_backward(grad, y, mask, act, params):
    return _kernels()["inverted_backward"](grad, y, mask, act, params)


def register_cuda_kernels() -> bool:
    """Register the Triton kernels as the ops' CUDA implementations; True if registered.

    Call after the ops are defined (fewbit_fx.ops does). Idempotent.
    """
    global _registered
    if _registered:
        return True
    if (
        os.environ.get("TRITON_INTERPRET", "0") == "1"
        or not torch.backends.cuda.is_built()
        or importlib.util.find_spec("triton") is None
    ):
        return False
    impls = dict(zip(_OPS, (_fewbit_forward, _fewbit_backward, _inverted_forward, _inverted_backward)))
    for name, fn in impls.items():
        torch.library.register_kernel(f"fewbit_fx::{name}", "cuda", fn)
    _registered = True
    return True


__all__ = ["register_cuda_kernels"]
