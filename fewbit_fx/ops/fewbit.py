"""Few-bit backward as custom ops: forward stores the b-bit interval code of x, backward
multiplies the incoming gradient by that interval's level (the optimal piecewise-constant
approximation of f', see fewbit_fx.tables).

Non-finite inputs. Where torch's derivative is NaN (x = NaN; also +-inf for GELU, SiLU,
Mish, Softsign, ...: Activation.nan_derivative) no code can say so: all 2^b codes are
intervals. So the packed codes end with one flag byte, set when any element is such an x,
computed in the same pass as the codes. Eager on CPU, the autograd wrapper then finds
those elements (only then: a rare second pass) and backward puts NaN exactly there. Where
that would cost a device sync per call (CUDA) or cannot be traced (torch.compile,
torch.func), the flag makes the whole gradient of that call NaN: NaN wherever torch's
is, and the step still shows as non-finite (gradient scalers skip it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from fewbit_fx.activations import Activation, from_op_args
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
    """(f(x), packed codes + flag byte). `levels` is unused here; it is an input so
    autograd saves it."""
    check_input(x, "FewBit")
    packed = codes(x, act, params, borders, levels, bits)  # first: its temporaries are gone before y
    return from_op_args(act, params).forward(x), packed


def codes(x: Tensor, act: str, params: list[float], borders: Tensor, levels: Tensor, bits: int) -> Tensor:
    """The packed codes + flag byte fewbit_forward saves, without computing y: the
    in-place variant (ops.inplace) writes y over x after this."""
    if cpu_kernels.usable(x):
        packed = cpu_kernels.fewbit_codes(x, act, params, borders, levels, bits)
        if packed is not None:
            return packed
    a, dt = from_op_args(act, params), compare_dtype(x.dtype)
    if not chunkable(x):
        return _packed_codes(x, a, borders, bits)
    flat, b = x.view(-1), borders.to(dt)
    packed = x.new_empty(packed_nbytes(x.numel(), bits) + 1, dtype=torch.uint8)
    packed[-1:] = 0
    for s, e in chunks(flat.numel()):
        xs = flat[s:e].to(dt)
        packed[s * bits // 8:(e * bits + 7) // 8] = pack(torch.bucketize(xs, b), bits)
        packed[-1:] |= _flag(a, xs)
    return packed


def _forward(x, act, params, borders, bits, search=torch.bucketize):
    check_input(x, "FewBit")
    a = from_op_args(act, params)
    return a.forward(x), _packed_codes(x, a, borders, bits, search)


def _packed_codes(x, a: Activation, borders, bits, search=torch.bucketize):
    """The whole tensor's packed codes and flag byte (`search`: Inductor's is
    _interval_index)."""
    dt = compare_dtype(x.dtype)
    xs = x.to(dt)
    if search is torch.bucketize:
        xs = xs.contiguous()  # bucketize would copy anyway, with a warning
    return torch.cat([pack(search(xs, borders.to(dt)), bits), _flag(a, xs)])


def _flag(a: Activation, xs: Tensor) -> Tensor:
    """One byte: 1 if torch's derivative is NaN at some element of xs."""
    bad = a.nan_derivative(xs)
    if bad is None:
        return xs.new_zeros(1, dtype=torch.uint8)
    return bad.any().to(torch.uint8).view(1)


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
    """grad * levels[code], in grad's dtype (multiplied in at least fp32); all NaN if the
    flag byte says some x had a NaN derivative (see the module docstring)."""
    if cpu_kernels.usable(grad):
        out = cpu_kernels.fewbit_backward(grad, packed, levels, bits)
        if out is not None:
            return out
    if not chunkable(grad):
        return _backward(grad, packed, levels, bits)
    g, out = grad.view(-1), torch.empty_like(grad)
    for s, e in chunks(g.numel()):
        out.view(-1)[s:e] = _times_level(g[s:e], packed[s * bits // 8:(e * bits + 7) // 8], levels, bits)
    if packed.device.type == "cpu":  # reading the flag is free here: no extra pass
        return out.fill_(math.nan) if packed[-1] else out
    return out.masked_fill_(packed[-1] != 0, math.nan)  # no device sync


def _backward(grad, packed, levels, bits, unpack=unpack):
    out = _times_level(grad, packed, levels, bits, unpack)
    return torch.where(packed[-1] != 0, math.nan, out)  # one flag for all: fused, no branch


def _times_level(grad, packed, levels, bits, unpack=unpack):
    codes = unpack(packed, bits, grad.numel()).to(torch.int64).view(grad.shape)
    dt = compare_dtype(grad.dtype)
    return (grad.to(dt) * levels.to(dt)[codes]).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    x, act, params, _, levels, bits = inputs
    packed = output[1]
    ctx.bits = bits
    ctx.nan_at = None
    if _is_eager_cpu(packed) and packed[-1]:  # rare: find the elements, clear the flag
        ctx.nan_at = torch.nonzero(from_op_args(act, params).nan_derivative(x).reshape(-1)).view(-1)
        packed = packed.clone()
        packed[-1] = 0
    ctx.save_for_backward(packed, levels)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient for the codes


def _is_eager_cpu(t: Tensor) -> bool:
    """A real CPU tensor outside any tracing: reading a value off it costs no sync."""
    return (type(t) is torch.Tensor and t.device.type == "cpu"
            and torch._C._len_torch_dispatch_stack() == 0 and not torch.compiler.is_compiling())


def _autograd_backward(ctx, grad_y, grad_packed):
    refuse_create_graph()
    if grad_y is None:  # only reachable with grads not materialised: nothing flows back
        return None, None, None, None, None, None
    packed, levels = ctx.saved_tensors
    out = fewbit_backward(grad_y.contiguous(), packed, levels, ctx.bits)
    if ctx.nan_at is not None:
        out.view(-1)[ctx.nan_at] = math.nan
    return out, None, None, None, None, None


def _fake_forward(x, act, params, borders, levels, bits):
    from fewbit_fx.ops import inductor

    inductor.register()  # a trace is under way: the compiler may come next
    return _forward(x, act, params, borders, bits)


def decomposed_forward(x, act, params, borders, levels, bits):
    """What Inductor sees instead of the op (fewbit_fx.ops.inductor)."""
    return _forward(x, act, params, borders, bits, _interval_index)


# The fakes run the same aten code on fake tensors, so shapes and strides always agree.
fewbit_forward.register_fake(_fake_forward)
fewbit_backward.register_fake(_backward)
fewbit_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
fewbit_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
