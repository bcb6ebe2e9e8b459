"""FewBit and Inverted under torch.func transforms (grad, vjp, jacrev, vmap).

A torch.library custom op differentiates through an autograd.Function that has no
setup_context, which torch.func refuses ("must override the setup_context staticmethod").
So while a transform is active, the modules call these autograd.Functions instead: the
same saved tensors (y and its mask, or the packed codes) and the same torch
implementations as the ops, in plain aten ops that vmap batches (each sample packs its
own elements). Ordinary autograd, torch.compile and torch.export keep the custom ops.
A derivative of the backward (grad of grad, jvp of grad, hessian) is refused, as it is by
the ops. Forward mode alone (jvp, jacfwd) never gets here: x does not require grad there,
so the modules run the plain activation.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

from fewbit_fx import packing
from fewbit_fx.ops import fewbit, inverted
from fewbit_fx.ops._common import no_double_backward


def active() -> bool:
    """Whether a torch.func transform is running (never asked while Dynamo traces: it
    cannot trace the query, and compiled graphs use the custom ops)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


class FewBitFunction(torch.autograd.Function):
    """(y, packed codes) as fewbit_fx::fewbit_forward; backward grad * levels[code]."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, act, params, borders, levels, bits):
        return fewbit._forward(x, act, params, borders, bits, fewbit._interval_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.bits = inputs[5]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1], inputs[4])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, grad_packed):
        if grad_y is None:
            return None, None, None, None, None, None
        packed, levels = ctx.saved_tensors
        return _FewBitBackward.apply(grad_y, packed, levels, ctx.bits), None, None, None, None, None


class _FewBitBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, packed, levels, bits):
        return fewbit._backward(grad, packed, levels, bits, packing.unpack)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(no_double_backward)


class InvertedFunction(torch.autograd.Function):
    """(y, packed mask) as fewbit_fx::inverted_forward; backward grad * f'(x) from y."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, act, params):
        return inverted._forward(x, act, params)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.act, ctx.params = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*output)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_y, grad_mask):
        if grad_y is None:
            return None, None, None
        y, mask = ctx.saved_tensors
        return _InvertedBackward.apply(grad_y, y, mask, ctx.act, ctx.params), None, None


class _InvertedBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(grad, y, mask, act, params):
        return inverted._backward(grad, y, mask, act, params, unpack=packing.unpack)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    backward = staticmethod(no_double_backward)


def fewbit_forward(x: Tensor, act: str, params: list[float], borders: Tensor, levels: Tensor,
                   bits: int) -> tuple[Tensor, Tensor]:
    _refuse_nested_derivatives()
    return FewBitFunction.apply(x, act, params, borders, levels, bits)


def inverted_forward(x: Tensor, act: str, params: list[float]) -> tuple[Tensor, Tensor]:
    _refuse_nested_derivatives()
    return InvertedFunction.apply(x, act, params)


_DERIVATIVES = (TransformType.Grad, TransformType.Jvp)


def _refuse_nested_derivatives() -> None:
    """Two differentiating transforms (grad of grad, jvp of grad, hessian) would take a
    derivative of our backward. FewBit's backward does not even depend on x
    differentiably, so that would come out silently zero: refuse, as create_graph=True is."""
    stack = retrieve_all_functorch_interpreters()
    if sum(i.key() in _DERIVATIVES for i in stack) > 1:
        no_double_backward(None)
