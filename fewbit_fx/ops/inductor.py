"""Inductor's view of the ops: decompositions (their bodies are plain aten, so Inductor
fuses them with their neighbours) and the unpack lowering.

Registered on first use of the compiler, not at import: importing torch._inductor costs
seconds, and most eager users never compile. The ops' fake implementations run at the
start of any trace (Dynamo, AOTAutograd, export), before Inductor reads its tables, and
call `register()`; so does the "fewbit" backend. It also puts fewbit-fx's implementation
hash into Inductor's cache key (fewbit_fx.cache_key), once, into an empty slot only.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_registered = False


def register() -> None:
    """Register everything once (idempotent, cheap after the first call)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        from torch._inductor.decomposition import register_decomposition

        from fewbit_fx import _compat, cache_key
        from fewbit_fx.ops import fewbit, inverted, norm, unpack

        ops = torch.ops.fewbit_fx
        register_decomposition(ops.fewbit_forward.default)(fewbit.decomposed_forward)
        register_decomposition(ops.fewbit_backward.default)(fewbit._backward)
        register_decomposition(ops.inverted_forward.default)(inverted._forward_compiled)
        register_decomposition(ops.inverted_backward.default)(inverted._backward_compiled)
        register_decomposition(ops.inverted_norm_forward.default)(norm._forward_compiled)
        register_decomposition(ops.inverted_norm_backward.default)(norm._backward)
        unpack.register_lowering()
        _compat.decompositions_changed()
        cache_key.install()  # plain torch.compile keys its caches on these decompositions too
        _registered = True
