"""In-place variants: y = f(x) written into x's own storage, as `F.silu(x, inplace=True)`
or `nn.SiLU(inplace=True)` does, keeping the caller's aliasing (x is y afterwards).

torch's own in-place activations keep a copy of the original x for backward (autograd's
`original_self`), so an in-place SiLU keeps as much as an out-of-place one. Here the saved
bits are taken from x first (the few-bit codes, or the branch mask), then torch's own
in-place op overwrites x (`Activation.forward_`), so forward values are torch's bit for
bit. Inverted then keeps x's storage itself, which now holds y and which the next layer
keeps anyway; few-bit keeps only the codes.

These are autograd Functions around the custom ops' pieces (custom ops cannot both
mutate an input and have an autograd formula); under torch.func transforms, which need
the functional ops, y is computed out of place and copied in.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewbit_fx.activations import from_op_args
from fewbit_fx.ops import fewbit, inverted, transforms


class _InvertedInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, act: str, params: list[float]) -> Tensor:
        mask = inverted.branch_mask(x, act, params)
        a = from_op_args(act, params)
        if torch.compiler.is_compiling():  # Inductor's y, as the out-of-place op's
            x.copy_(inverted.compiled_output(a, x))
        else:
            a.forward_(x)
        ctx.mark_dirty(x)
        ctx.act, ctx.params = act, params
        ctx.save_for_backward(x, mask)  # x holds y now
        ctx.set_materialize_grads(False)
        return x

    @staticmethod
    def backward(ctx, grad_y):
        return inverted._autograd_backward(ctx, grad_y, None)


class _FewBitInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, act: str, params: list[float], borders: Tensor, levels: Tensor,
                bits: int) -> Tensor:
        packed = fewbit.codes(x, act, params, borders, levels, bits)
        # before x is overwritten: it finds NaN-derivative elements from x (rare)
        fewbit._setup_context(ctx, (x, act, params, borders, levels, bits), (None, packed))
        from_op_args(act, params).forward_(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, grad_y):
        return fewbit._autograd_backward(ctx, grad_y, None)


def inverted_forward_(x: Tensor, act: str, params: list[float]) -> Tensor:
    """x <- f(x), backward from y (x's storage) and the branch mask; returns x."""
    if transforms.active():
        return x.copy_(transforms.inverted_forward(x, act, params)[0])
    return _InvertedInPlace.apply(x, act, params)


def fewbit_forward_(x: Tensor, act: str, params: list[float], borders: Tensor, levels: Tensor,
                    bits: int) -> Tensor:
    """x <- f(x), backward from the b-bit codes; returns x."""
    if transforms.active():
        return x.copy_(transforms.fewbit_forward(x, act, params, borders, levels, bits)[0])
    return _FewBitInPlace.apply(x, act, params, borders, levels, bits)
