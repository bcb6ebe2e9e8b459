"""Unpacking codes as a custom op of its own, so that Inductor reads them without checks.

Traced as aten ops, `packing.unpack` reads byte (i*bits)//8 through an index tensor that
it computes from arange: Inductor emits, per element, wrap-around for negative indices, a
bounds check and the gathered load, from about ten graph nodes per call. The lowering here
is one node whose loads skip both checks (the bytes are in range by construction), and it
fuses into the consumer's loop just the same.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewbit_fx.packing import check_bits, unpack as unpack_eager


@torch.library.custom_op("fewbit_fx::unpack", mutates_args=())
def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first `numel` codes of `packed` (see fewbit_fx.packing), as a new uint8 tensor."""
    codes = unpack_eager(packed, bits, numel)
    return codes.clone() if bits == 8 else codes  # a custom op may not return a view


@unpack.register_fake
def _(packed, bits, numel):
    from fewbit_fx.ops import inductor

    inductor.register()  # a trace is under way: the compiler may come next
    check_bits(bits)
    return packed.new_empty(numel, dtype=torch.uint8)


def register_lowering() -> None:
    """Called once by fewbit_fx.ops.inductor.register (importing Inductor costs seconds)."""
    from torch._inductor.lowering import register_lowering as register

    register(torch.ops.fewbit_fx.unpack.default, type_promotion_kind=None)(_unpack_lowering)


def _unpack_lowering(packed, bits: int, numel):
    """Code i = bits [i*bits, (i+1)*bits) of the stream: the byte holding its first bit,
    plus, when the code straddles, the byte holding its last (for a code within one byte
    that is the same byte again, whose copy shifts out of the mask). Both are in range, so
    the loads skip Inductor's wrap-around and bounds checks. They stay indirect loads
    (index computed in-loop, not a FloorDiv index expression), since with FloorDiv in an
    index the C++ backend gives up vectorising the whole consumer loop."""
    from torch._inductor import ir
    from torch._inductor.virtualized import ops

    check_bits(bits)
    load = packed.make_loader()
    nbytes = packed.get_size()[0]
    i32 = torch.int32
    index_dtype = i32 if _fits_int32(numel * bits) else torch.int64

    def code(index):
        pos = ops.index_expr(index[0] * bits, index_dtype)

        def byte_of(bit_offset: int):
            at = ops.bitwise_right_shift(ops.add(pos, ops.constant(bit_offset, index_dtype)),
                                         ops.constant(3, index_dtype))
            return ops.to_dtype(load([ops.indirect_indexing(at, nbytes, check=False, wrap_neg=False)]), i32)

        word = byte_of(0)
        if bits == 8:
            return ops.to_dtype(word, torch.uint8)
        if 8 % bits:
            word = ops.add(word, ops.mul(byte_of(bits - 1), ops.constant(256, i32)))
        shift = ops.to_dtype(ops.bitwise_and(pos, ops.constant(7, index_dtype)), i32)
        value = ops.bitwise_and(ops.bitwise_right_shift(word, shift), ops.constant((1 << bits) - 1, i32))
        return ops.to_dtype(value, torch.uint8)

    return ir.Pointwise.create(device=packed.get_device(), dtype=torch.uint8, inner_fn=code,
                               ranges=[numel])


def _fits_int32(n) -> bool:
    """Static sizes below 2^31 index in int32 (16 lanes per vector); symbolic ones in int64."""
    try:
        return int(n) < 2**31
    except TypeError:  # a size with free symbols
        return False
