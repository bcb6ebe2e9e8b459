"""Inductor-compiled CPU kernels for eager calls of the custom ops on long tensors.

Eager, the ops' bodies are dozens of small torch ops (binary search, bit packing, the
inverse's coordinate and table reads): 20-160 ns per element on CPU, against ~1 for the
plain activation. torch.compile of a one-op function turns the same body, through the ops'
Inductor decompositions, into one fused, vectorised C++ loop. So a long CPU tensor goes
through such a compiled function, built once per op and constant arguments (shapes are
dynamic, so other sizes reuse it), and cached on disk by Inductor across processes.

Forward outputs y stay torch's own (bitwise equal to the plain module): only the codes or
the mask come from the compiled kernel, and Inductor drops the y it would have computed.

Short tensors, other devices, FEWBIT_FX_CPU_KERNELS=0, and any kernel that fails to
compile (for example with no C++ compiler: the first failure warns, and a failed kernel is
not tried again) use the torch-op path.
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable

import torch
from torch import Tensor

MIN_NUMEL = 1 << 16  # below this the torch ops cost less than a compiled call's overhead
_RECOMPILE_LIMIT = 256

_COMPILED: dict[tuple, Callable | None] = {}  # by op and constant arguments; None: failed
_state = threading.local()  # .inside: a compiled call is running on this thread
_failed: list[str] = []  # what failed, for debugging


def usable(t: Tensor) -> bool:
    """Whether an eager call on t should take a compiled kernel."""
    return (
        t.device.type == "cpu"
        and t.numel() >= MIN_NUMEL
        and not getattr(_state, "inside", False)  # a fallback inside a compiled call
        and os.environ.get("FEWBIT_FX_CPU_KERNELS", "1") != "0"
        and not torch.compiler.is_compiling()
    )


def run(key: tuple, make: Callable[[], Callable], *tensors: Tensor):
    """make()(*tensors) compiled (one function per key, dynamic in shapes, static in the
    constants make() closes over), or None if that failed: the caller then takes its
    torch-op path. A failed key is not tried again; the first failure warns."""
    compiled = _COMPILED.get(key, ...)
    if compiled is None:
        return None
    _state.inside = True  # anything that runs eagerly in there must not come back here
    try:
        if compiled is ...:
            compiled = _COMPILED[key] = torch.compile(make(), dynamic=True, fullgraph=True)
        # bits stays a Python int; every key's function shares its lambda's code object,
        # whose cache holds one entry per key and dtype (Dynamo's default limit is 8).
        with torch._dynamo.config.patch(specialize_int=True, recompile_limit=_RECOMPILE_LIMIT):
            return compiled(*tensors)
    except Exception as e:  # noqa: BLE001 - a missing compiler must not break training
        _COMPILED[key] = None
        if not _failed:
            warnings.warn(
                f"fewbit_fx: a compiled CPU kernel is unavailable ({type(e).__name__}: {e}); "
                "those eager calls use torch ops (correct, but slower). Set "
                "FEWBIT_FX_CPU_KERNELS=0 to skip compiling.", RuntimeWarning, stacklevel=3)
        _failed.append(f"{key}: {e!r}")
        return None
    finally:
        _state.inside = False


# --- the four ops ---------------------------------------------------------------------------
def fewbit_codes(x: Tensor, act: str, params: list[float], borders: Tensor, levels: Tensor,
                 bits: int) -> Tensor | None:
    """The packed codes of fewbit_forward (its y is discarded, so never computed)."""
    op = torch.ops.fewbit_fx.fewbit_forward.default
    p = list(params)
    return run(("fewbit_codes", act, tuple(p), bits),
               lambda: lambda x, b, lv: op(x, act, p, b, lv, bits)[1], x, borders, levels)


def fewbit_backward(grad: Tensor, packed: Tensor, levels: Tensor, bits: int) -> Tensor | None:
    op = torch.ops.fewbit_fx.fewbit_backward.default
    return run(("fewbit_backward", bits), lambda: lambda g, pk, lv: op(g, pk, lv, bits),
               grad, packed, levels)


def inverted_mask(x: Tensor, act: str, params: list[float]) -> Tensor | None:
    """The packed branch mask of inverted_forward (its y is discarded)."""
    op = torch.ops.fewbit_fx.inverted_forward.default
    p = list(params)
    return run(("inverted_mask", act, tuple(p)), lambda: lambda x: op(x, act, p)[1], x)


def inverted_backward(grad: Tensor, y: Tensor, mask: Tensor, act: str,
                      params: list[float]) -> Tensor | None:
    op = torch.ops.fewbit_fx.inverted_backward.default
    p = list(params)
    return run(("inverted_backward", act, tuple(p)),
               lambda: lambda g, y, m: op(g, y, m, act, p), grad, y, mask)
