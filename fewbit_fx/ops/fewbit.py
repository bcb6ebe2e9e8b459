"""Few-bit backward as custom ops: forward stores the b-bit interval code of x, backward
multiplies the incoming gradient by that interval's level (the optimal piecewise-constant
approximation of f', see fewbit_fx.tables).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._inductor.decomposition import register_decomposition

from fewbit_fx.activations import from_op_args
from fewbit_fx.kernels import cpu as cpu_kernels
from fewbit_fx.ops._common import (
    check_input, chunkable, chunks, compare_dtype, no_double_backward, refuse_create_graph,
)
from fewbit_fx.ops.unpack import unpack
from fewbit_fx.packing import pack, packed_nbytes


@torch.library.custom_op("fewbit_fx::fewbit_forward", mutates_args=())
def fewbit_forward(
    x: Tensor, act: str, params: list[float], borders: Tensor, levels: Tensor, bits: int
) -> tuple[Tensor, Tensor]:
    """(f(x), packed codes). `levels` is unused here; it is an input so autograd saves it."""
    if cpu_kernels.usable(x):
        check_input(x, "FewBit")
        packed = cpu_kernels.fewbit_codes(x, act, params, borders, levels, bits)
        if packed is not None:
            return from_op_args(act, params).forward(x), packed
    if not chunkable(x):
        return _forward(x, act, params, borders, bits)
    check_input(x, "FewBit")
    dt = compare_dtype(x.dtype)
    flat, b = x.view(-1), borders.to(dt)
    packed = x.new_empty(packed_nbytes(x.numel(), bits), dtype=torch.uint8)
    for s, e in chunks(flat.numel()):
        packed[s * bits // 8:(e * bits + 7) // 8] = pack(torch.bucketize(flat[s:e].to(dt), b), bits)
    return from_op_args(act, params).forward(x), packed


def _forward(x, act, params, borders, bits, search=torch.bucketize):
    check_input(x, "FewBit")
    y = from_op_args(act, params).forward(x)
    dt = compare_dtype(x.dtype)
    xs = x.to(dt)
    if search is torch.bucketize:
        xs = xs.contiguous()  # bucketize would copy anyway, with a warning
    codes = search(xs, borders.to(dt))
    return y, pack(codes, bits)


COUNT_MAX_BORDERS = 15  # up to 4 bits: count the borders below x; above: binary search


def _interval_index(x: Tensor, borders: Tensor) -> Tensor:
    """bucketize(x, borders) for sorted borders, in ops Inductor fuses (aten.bucketize is
    an extern call on CPU). Up to 15 borders it counts those below x: plain vectorised
    compares, 2-5x faster compiled than the b steps of a binary search, whose indexed
    loads do not vectorise. `~(x <= border)` sends NaN to the last interval, as bucketize
    does."""
    if borders.numel() <= COUNT_MAX_BORDERS:
        idx = torch.zeros_like(x, dtype=torch.int64)
        for k in range(borders.numel()):
            idx = idx + (~(x <= borders[k])).to(torch.int64)
        return idx
    steps = (borders.numel() + 1).bit_length() - 1
    idx = torch.zeros_like(x, dtype=torch.int64)
    for k in reversed(range(steps)):
        cand = idx + (1 << k)
        idx = torch.where(~(x <= borders[cand - 1]), cand, idx)
    return idx


@torch.library.custom_op("fewbit_fx::fewbit_backward", mutates_args=())
def fewbit_backward(grad: Tensor, packed: Tensor, levels: Tensor, bits: int) -> Tensor:
    """grad * levels[code], in grad's dtype (multiplied in at least fp32)."""
    if cpu_kernels.usable(grad):
        out = cpu_kernels.fewbit_backward(grad, packed, levels, bits)
        if out is not None:
            return out
    if not chunkable(grad):
        return _backward(grad, packed, levels, bits)
    g, out = grad.view(-1), torch.empty_like(grad)
    for s, e in chunks(g.numel()):
        out.view(-1)[s:e] = _backward(g[s:e], packed[s * bits // 8:(e * bits + 7) // 8], levels, bits)
    return out


def _backward(grad, packed, levels, bits):
    codes = unpack(packed, bits, grad.numel()).to(torch.int64).view(grad.shape)
    dt = compare_dtype(grad.dtype)
    return (grad.to(dt) * levels.to(dt)[codes]).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    _, _, _, _, levels, bits = inputs
    ctx.bits = bits
    ctx.save_for_backward(output[1], levels)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient for the codes


def _autograd_backward(ctx, grad_y, grad_packed):
    refuse_create_graph()
    if grad_y is None:  # only reachable with grads not materialised: nothing flows back
        return None, None, None, None, None, None
    packed, levels = ctx.saved_tensors
    return fewbit_backward(grad_y.contiguous(), packed, levels, ctx.bits), None, None, None, None, None


# The fakes run the same aten code on fake tensors, so shapes and strides always agree.
fewbit_forward.register_fake(
    lambda x, act, params, borders, levels, bits: _forward(x, act, params, borders, bits)
)
fewbit_backward.register_fake(_backward)
fewbit_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
fewbit_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)

# Inductor sees through both ops: their bodies are plain aten, so they fuse with neighbours.
register_decomposition(torch.ops.fewbit_fx.fewbit_forward.default)(
    lambda x, act, params, borders, levels, bits: _forward(x, act, params, borders, bits, _interval_index)
)
register_decomposition(torch.ops.fewbit_fx.fewbit_backward.default)(_backward)
