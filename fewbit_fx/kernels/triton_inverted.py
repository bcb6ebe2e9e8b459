"""Triton kernels for fewbit_fx::inverted_forward / inverted_backward (one pass each).

forward reads x once and writes y = f(x) plus, where y alone does not tell the branch
(`Activation.saves_mask`), the 1-bit packed mask `Activation.mask_bit` (compared in fp32);
backward reads grad, y and the mask once and writes grad * f'(x) from the closed form of
f' in y.

gelu, gelu_tanh, silu, mish and tanhshrink (and the Hugging Face formula GELUs and
quick_gelu) have no closed form in y: their backward needs the numerical inverse in
fewbit_fx.inverse, so for now `inverted_backward` sends them, like float64 and ELU/CELU
with alpha <= 0 (which torch's result-based backward rejects), to the op's torch
implementation fewbit_fx.ops.inverted._backward: correct, but several passes on CUDA.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fewbit_fx.activations import from_op_args
from fewbit_fx.kernels.triton_common import (
    BLOCK, CLOSED_FORM_BACKWARD, COMPILE_OPTIONS, NUM_WARPS, activation_forward,
    block_offsets, derivative_times_grad, kernel_params, like_input, load_packed, mask_bit, store_packed,
    supported_activation, supported_dtype, to_dtype,
)
from fewbit_fx.ops import inverted as _torch_impl
from fewbit_fx.packing import packed_nbytes


@triton.jit
def _inverted_forward_kernel(
    x_ptr, y_ptr, mask_ptr, n, nbytes, BRANCH, P0, P1, P2,
    ACT: tl.constexpr, NEEDS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    G: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    offs, mask = block_offsets(pid, n, G)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = activation_forward(x, P0, P1, P2, ACT, x_ptr.dtype.element_ty)
    tl.store(y_ptr + offs, to_dtype(y, y_ptr.dtype.element_ty), mask=mask)
    if NEEDS_MASK:
        store_packed(mask_ptr, (mask & mask_bit(x, BRANCH, P0, P1, ACT)).to(tl.int32), pid, nbytes, 1, G)


@triton.jit
def _inverted_backward_kernel(
    grad_ptr, y_ptr, mask_ptr, out_ptr, n, nbytes, P0, P1, P2,
    ACT: tl.constexpr, NEEDS_MASK: tl.constexpr, BLOCK: tl.constexpr,
):
    G: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    offs, mask = block_offsets(pid, n, G)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if NEEDS_MASK:
        right = load_packed(mask_ptr, pid, nbytes, 1, G)
    else:
        right = tl.zeros(y.shape, tl.int32)  # unused: y alone fixes the branch
    out = derivative_times_grad(g, y, right, P0, P1, P2, ACT, NEEDS_MASK, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, to_dtype(out, out_ptr.dtype.element_ty), mask=mask)


def _fp32(v: float) -> float:
    """The branch point as torch compares it: `x.float() > v` casts the scalar to fp32."""
    return float(torch.tensor(v, dtype=torch.float32))


def inverted_forward(
    x: torch.Tensor, act: str, params: list[float], *, block: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), packed mask) like fewbit_fx.ops.inverted._forward, in one kernel."""
    if not (supported_dtype(x.dtype) and supported_activation(act)):
        return _torch_impl._forward(x, act, params)
    a = from_op_args(act, params)
    act_id, p0, p1, p2 = kernel_params(a)
    xc = x.contiguous()
    y = torch.empty_like(xc)
    masked = a.saves_mask(x.dtype)
    nbytes = packed_nbytes(xc.numel(), 1) if masked else 0
    packed = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    if xc.numel() == 0:
        return like_input(y, x), packed
    branch = _fp32(a.branch_point) if a.needs_mask else 0.0
    grid = (triton.cdiv(xc.numel(), block),)
    mask_arg = packed if masked else xc  # never read without a mask; no null pointer
    _inverted_forward_kernel[grid](
        xc, y, mask_arg, xc.numel(), nbytes, branch, p0, p1, p2,
        ACT=act_id, NEEDS_MASK=masked, BLOCK=block, num_warps=NUM_WARPS,
        **COMPILE_OPTIONS,
    )
    return like_input(y, x), packed


def has_closed_form_backward(act: str, params: list[float]) -> bool:
    """True when inverted_backward runs the Triton kernel (not the torch fallback)."""
    a = from_op_args(act, params)
    if act in ("elu", "celu") and a.needs_mask:
        return False  # torch's elu_backward(is_result=True) raises for alpha <= 0
    return act in CLOSED_FORM_BACKWARD


def inverted_backward(
    grad: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, act: str, params: list[float],
    *, block: int = BLOCK,
) -> torch.Tensor:
    """grad * f'(x) from y (and mask) like fewbit_fx.ops.inverted._backward, in one kernel."""
    if (
        not has_closed_form_backward(act, params)
        or not supported_dtype(grad.dtype)
        or y.dtype != grad.dtype
        or y.shape != grad.shape
    ):
        return _torch_impl._backward(grad, y, mask, act, params)
    a = from_op_args(act, params)
    act_id, p0, p1, p2 = kernel_params(a)
    g = grad.contiguous()
    yc = y.contiguous()
    out = torch.empty_like(g)
    if g.numel() == 0:
        return like_input(out, grad)
    masked = a.saves_mask(y.dtype)
    mk = mask.reshape(-1).contiguous() if masked else g  # g: unused placeholder
    grid = (triton.cdiv(g.numel(), block),)
    _inverted_backward_kernel[grid](
        g, yc, mk, out, g.numel(), mk.numel(), p0, p1, p2,
        ACT=act_id, NEEDS_MASK=masked, BLOCK=block, num_warps=NUM_WARPS,
        **COMPILE_OPTIONS,
    )
    return like_input(out, grad)
