"""Triton kernels for fewbit_fx::fewbit_forward / fewbit_backward (one pass each).

forward reads x once and writes y = f(x) and the packed b-bit interval codes
(`torch.bucketize(x, borders)`, right=False, compared in fp32) followed by the flag byte
of fewbit_fx.ops.fewbit (some x had a NaN derivative); backward reads grad and the codes
once and writes grad * levels[code], or NaN everywhere when the flag is set. The
launchers take the op's arguments and return what the torch implementations in
fewbit_fx.ops.fewbit return, byte for byte for the codes; float64 and unusual tables
(more borders than codes, too few levels) go to those torch implementations.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fewbit_fx.activations import from_op_args
from fewbit_fx.kernels.triton_common import (
    BLOCK, COMPILE_OPTIONS, NUM_WARPS, activation_forward, block_offsets, kernel_params,
    like_input, load_packed, store_packed, supported_activation, supported_dtype, to_dtype,
)
from fewbit_fx.ops import fewbit as _torch_impl
from fewbit_fx.packing import check_bits, packed_nbytes

# Up to this many bits the code is a sum of 2**b - 1 comparisons against scalar borders;
# above it a b-step binary search of per-element gathers is cheaper.
LINEAR_SEARCH_MAX_BITS = tl.constexpr(2)


@triton.jit
def _bucketize(x, borders_ptr, NB, BITS: tl.constexpr):
    """Number of borders < x (NaN counts all), i.e. torch.bucketize(right=False).

    borders holds exactly 2**BITS - 1 sorted values (padded with +inf past the NB real
    ones); the clamp to NB keeps NaN at NB, where torch puts it.
    """
    if BITS <= LINEAR_SEARCH_MAX_BITS:
        code = tl.zeros(x.shape, tl.int32)
        for i in tl.static_range((1 << BITS) - 1):
            code += tl.where(tl.load(borders_ptr + i) >= x, 0, 1)
    else:
        # Uniform binary search: after the step of width h, code counts every border < x
        # among the first code + h (h = 2**(BITS-1), ..., 1).
        half = 1 << (BITS - 1)
        code = tl.where(tl.load(borders_ptr + (half - 1)) >= x, 0, half)  # same border for all
        for s in tl.static_range(1, BITS):
            half = 1 << (BITS - 1 - s)
            border = tl.load(borders_ptr + code + (half - 1))
            code = tl.where(border >= x, code, code + half)
    return tl.minimum(code, NB)


# Activation.nan_derivative as a kernel switch: where torch's derivative is NaN.
NAN_TESTS = {"never": 0, "nan": 1, "nonfinite": 2}


@triton.jit
def _fewbit_forward_kernel(
    x_ptr, y_ptr, packed_ptr, borders_ptr, n, nbytes, NB, P0, P1, P2,
    ACT: tl.constexpr, BITS: tl.constexpr, NAN_TEST: tl.constexpr, BLOCK: tl.constexpr,
):
    G: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    offs, mask = block_offsets(pid, n, G)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = activation_forward(x, P0, P1, P2, ACT, x_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)
    code = tl.where(mask, _bucketize(x, borders_ptr, NB, BITS), 0)  # pad codes with 0
    store_packed(packed_ptr, code, pid, nbytes, BITS, G)
    if NAN_TEST != 0:  # the flag byte after the codes (zeroed by the launcher)
        bad = (x != x) if NAN_TEST == 1 else ~(tl.abs(x) < float("inf"))
        hit = tl.max(tl.max((bad & mask).to(tl.int32), axis=1), axis=0)
        tl.store(packed_ptr + nbytes, hit.to(tl.uint8), mask=hit > 0)


@triton.jit
def _fewbit_backward_kernel(
    grad_ptr, packed_ptr, levels_ptr, out_ptr, n, nbytes,
    BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    G: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    offs, mask = block_offsets(pid, n, G)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    level = tl.load(levels_ptr + load_packed(packed_ptr, pid, nbytes, BITS, G))
    flag = tl.load(packed_ptr + nbytes)  # some x had a NaN derivative: all NaN (ops.fewbit)
    out = tl.where(flag != 0, float("nan"), g * level)
    tl.store(out_ptr + offs, to_dtype(out, out_ptr.dtype.element_ty), mask=mask)


def fewbit_forward(
    x: torch.Tensor, act: str, params: list[float], borders: torch.Tensor,
    levels: torch.Tensor, bits: int, *, block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), packed codes) like fewbit_fx.ops.fewbit._forward, in one kernel."""
    check_bits(bits)
    n_codes = (1 << bits) - 1
    if not (supported_dtype(x.dtype) and supported_activation(act)) or borders.numel() > n_codes:
        return _torch_impl._forward(x, act, params, borders, bits)
    a = from_op_args(act, params)
    act_id, p0, p1, p2 = kernel_params(a)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    nbytes = packed_nbytes(xc.numel(), bits)
    packed = torch.empty(nbytes + 1, dtype=torch.uint8, device=x.device)
    packed[nbytes:].zero_()  # the flag byte
    if xc.numel() == 0:
        return like_input(y, x), packed
    b = borders.to(device=x.device, dtype=torch.float32).reshape(-1)
    if b.numel() < n_codes:  # pad so the binary search always sees 2**bits - 1 borders
        b = torch.cat([b, b.new_full((n_codes - b.numel(),), float("inf"))])
    b = b.contiguous()
    grid = (triton.cdiv(xc.numel(), block),)
    _fewbit_forward_kernel[grid](
        xc, y, packed, b, xc.numel(), nbytes, borders.numel(), p0, p1, p2,
        ACT=act_id, BITS=bits, NAN_TEST=NAN_TESTS[a.spec.nan_derivative], BLOCK=block,
        num_warps=NUM_WARPS, **COMPILE_OPTIONS,
    )
    return like_input(y, x), packed


def fewbit_backward(
    grad: torch.Tensor, packed: torch.Tensor, levels: torch.Tensor, bits: int,
    *, block: int = BLOCK,
) -> torch.Tensor:
    """grad * levels[code] like fewbit_fx.ops.fewbit._backward, in one kernel."""
    check_bits(bits)
    if not supported_dtype(grad.dtype) or levels.numel() < (1 << bits):
        return _torch_impl._backward(grad, packed, levels, bits)
    g = grad.contiguous()
    out = torch.empty_like(g)
    if g.numel() == 0:
        return like_input(out, grad)
    lv = levels.to(device=grad.device, dtype=torch.float32).reshape(-1).contiguous()
    pk = packed.reshape(-1).contiguous()
    grid = (triton.cdiv(g.numel(), block),)
    _fewbit_backward_kernel[grid](
        g, pk, lv, out, g.numel(), pk.numel() - 1,  # the codes; the flag byte follows
        BITS=bits, BLOCK=block, num_warps=NUM_WARPS, **COMPILE_OPTIONS,
    )
    return like_input(out, grad)
