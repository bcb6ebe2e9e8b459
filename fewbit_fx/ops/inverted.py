"""Inverted activations as custom ops: forward saves its own output y (plus a 1-bit branch
mask for non-monotone functions), backward computes f'(x) from y.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fewbit_fx.activations import Activation, from_op_args
# Imported eagerly: its tables are built on import, never while torch.compile traces.
from fewbit_fx.inverse import derivative_from_output, tanhshrink_half_derivative
from fewbit_fx.kernels import cpu as cpu_kernels
from fewbit_fx.ops import forward32
from fewbit_fx.ops._common import (
    check_input, chunkable, chunks, compare_dtype, no_double_backward, refuse_create_graph,
)
from fewbit_fx.ops.unpack import unpack
from fewbit_fx.packing import pack, packed_nbytes


@torch.library.custom_op("fewbit_fx::inverted_forward", mutates_args=())
def inverted_forward(x: Tensor, act: str, params: list[float]) -> tuple[Tensor, Tensor]:
    """(f(x), packed 1-bit mask Activation.mask_bit); empty when y alone tells the branch."""
    check_input(x, "Inverted")
    mask = branch_mask(x, act, params)  # first: its temporaries are gone before y
    return from_op_args(act, params).forward(x), mask


def branch_mask(x: Tensor, act: str, params: list[float]) -> Tensor:
    """The packed mask inverted_forward saves (empty where y alone tells the branch),
    without computing y: the in-place variant (ops.inplace) writes y over x after this."""
    a = from_op_args(act, params)
    if not a.saves_mask(x.dtype):
        return x.new_empty(0, dtype=torch.uint8)
    if cpu_kernels.usable(x):
        mask = cpu_kernels.inverted_mask(x, act, params)
        if mask is not None:
            return mask
    if not chunkable(x):
        return _whole_mask(x, a)
    flat, mask = x.view(-1), x.new_empty(packed_nbytes(x.numel(), 1), dtype=torch.uint8)
    for s, e in chunks(flat.numel()):
        mask[s // 8:(e + 7) // 8] = pack(a.mask_bit(flat[s:e].to(compare_dtype(x.dtype))), 1)
    return mask


def _forward(x, act, params, output=None):
    check_input(x, "Inverted")
    a = from_op_args(act, params)
    y = a.forward(x) if output is None else output(a, x)
    return y, _whole_mask(x, a)


def _whole_mask(x: Tensor, a: Activation) -> Tensor:
    """The whole tensor's packed mask (empty where y alone tells the branch)."""
    if not a.saves_mask(x.dtype):
        return x.new_empty(0, dtype=torch.uint8)
    return pack(a.mask_bit(x.to(compare_dtype(x.dtype))), 1)


def _forward_compiled(x, act, params):
    """Inductor's version: y = compiled_output(f, x)."""
    return _forward(x, act, params, compiled_output)


def compiled_output(a: Activation, x: Tensor) -> Tensor:
    """y = f(x) as the compiled forward computes it: for float32 x of GELU (both forms),
    Mish and their formula twins, fewbit_fx.ops.forward32's, rounded as the numerical
    inverse needs it at the minimum; else f as torch writes it.

    The numerical inverse is accurate to the floor of a correctly rounded y (within
    0.5 ulp), and near the minimum, where f' ~ sqrt(2 f'' (y - y_min)), every ulp of y
    costs: Inductor's float32 GELU, 0.5 x (1 + erf(x / sqrt 2)), is off by up to ~9 ulps
    there (its vectorised erf has ~1.5e-7 absolute error, and 1 + erf cancels), which gave
    f' errors of 3.05e-4 against a floor of 4.76e-5; tanh GELU (2.5 ulps) 1.43e-4 against
    5.14e-5, Mish (1.9 ulps) 1.44e-4 against 6.92e-5 (eager torch is no better: its y
    stays torch's own, see inverted_forward). forward32 computes y = y_min + P(x - x_min)
    for |x - x_min| < 1/8 (within 0.55 ulp), which brings all three to the floor (4.62e-5,
    4.77e-5, 6.91e-5), one fused float32 kernel at 1.23-1.29x the cost of Inductor's erf
    GELU forward, 1.04x its Mish and 0.81-0.84x its tanh GELU (whose whole float32 form it
    replaces: see forward32). SiLU (1.7x the floor as Inductor computes it) and Tanhshrink
    keep torch's float32. Half x needs nothing: Inductor computes it in float32 and rounds
    once. Closed forms read f' from y directly, so an ulp of y costs an ulp of f'.

    FLOAT64_FORWARD (off by default) computes f in float64 instead and rounds once:
    correctly rounded (but for the tails of the 1 + erf, 1 + tanh forms), at 1.7-7x the
    forward kernel's cost.
    """
    base = a.twin[0] if a.twin is not None else a
    if x.dtype == torch.float32 and base.name in FLOAT64_FORWARD:
        return a.forward(x.double()).to(x.dtype)
    if x.dtype == torch.float32 and base.name in _FORWARD32 and (a.twin is None or a.twin[1] == 1):
        return forward32.output(a, base.name, x)
    return a.forward(x)


_FORWARD32 = ("gelu", "gelu_tanh", "mish")  # fewbit_fx.ops.forward32's, for float32 x

# Where the compiled forward computes f in float64 (see compiled_output), before
# _FORWARD32. Empty: forward32 reaches the floor as well for GELU and Mish, while float64
# cost 1.15-1.27x a compiled GELU model's step (reports/benchmarks.md, small scale), and
# SiLU (1.7x the floor) would pay 10x its forward. FLOAT64_FORWARD = ("gelu", "gelu_tanh",
# "mish") turns it on.
FLOAT64_FORWARD: tuple[str, ...] = ()


@torch.library.custom_op("fewbit_fx::inverted_backward", mutates_args=())
def inverted_backward(grad: Tensor, y: Tensor, mask: Tensor, act: str, params: list[float]) -> Tensor:
    """grad * f'(x), with x recovered from y (and the branch mask)."""
    a = from_op_args(act, params)
    # Not for half tanhshrink: its lookup is cheap eagerly, and the compiled kernel would
    # assume Inductor's forward (see _backward_compiled), not the eager one that ran.
    if cpu_kernels.usable(grad) and not (a.exact_from_output or _tanhshrink_table(a, y)):
        out = cpu_kernels.inverted_backward(grad, y, mask, act, params)
        if out is not None:
            return out
    if not chunkable(grad, y):
        return _backward(grad, y, mask, act, params)
    g, yf, out = grad.view(-1), y.view(-1), torch.empty_like(grad)
    masked = mask.numel() > 0
    for s, e in chunks(g.numel()):
        m = mask[s // 8:(e + 7) // 8] if masked else mask
        out.view(-1)[s:e] = _backward(g[s:e], yf[s:e], m, act, params)
    return out


def _backward(grad, y, mask, act, params, rounded_tanh=True, unpack=unpack):
    a = from_op_args(act, params)
    right = (unpack(mask, 1, y.numel()).view(y.shape) != 0) if a.saves_mask(y.dtype) else None
    return grad_from_output(a, grad, y, right, rounded_tanh)


def _backward_compiled(grad, y, mask, act, params):
    """Inductor's version: there the forward is Inductor's too, which computes half
    tanhshrink in fp32 and rounds once."""
    return _backward(grad, y, mask, act, params, rounded_tanh=False)


def _tanhshrink_table(a: Activation, y: Tensor) -> bool:
    return a.name == "tanhshrink" and y.dtype in (torch.float16, torch.bfloat16)


def grad_from_output(a: Activation, grad: Tensor, y: Tensor, right: Tensor | None,
                     rounded_tanh: bool = True) -> Tensor:
    """grad * f'(x): a closed form in y where one exists, else the numerical inverse.
    rounded_tanh: half tanhshrink's y came from eager torch, x - (tanh x rounded)."""
    if a.exact_from_output:
        return a.spec.inverse.grad_from_output(grad, y, right, a.p)
    dt = compare_dtype(grad.dtype)
    if _tanhshrink_table(a, y):
        return (grad.to(dt) * tanhshrink_half_derivative(y, rounded_tanh).to(dt)).to(grad.dtype)
    nan_at_inf = a.spec.nan_derivative == "nonfinite"
    if a.twin is not None:  # f(x) = twin(s*x)/s, so f'(x) = twin'(x') with twin(x') = s*y
        twin, scale = a.twin
        y = y.to(dt) * scale if scale != 1.0 else y
        a = twin
    d = derivative_from_output(a, y, right, dtype=dt)
    if nan_at_inf:  # torch's f'(+inf) is inf * 0 = NaN (GELU, SiLU, ...): + 0 * y gives it
        d = d + 0.0 * y.to(dt)
    return (grad.to(dt) * d).to(grad.dtype)


def _setup_context(ctx, inputs, output):
    _, ctx.act, ctx.params = inputs
    y, mask = output
    ctx.save_for_backward(y, mask)
    ctx.set_materialize_grads(False)  # else autograd allocates a zero gradient for the codes


def _autograd_backward(ctx, grad_y, grad_mask):
    refuse_create_graph()
    if grad_y is None:  # only reachable with grads not materialised: nothing flows back
        return None, None, None
    y, mask = ctx.saved_tensors
    return inverted_backward(grad_y.contiguous(), y, mask, ctx.act, ctx.params), None, None


def _fake_forward(x, act, params):
    from fewbit_fx.ops import inductor

    inductor.register()  # a trace is under way: the compiler may come next
    return _forward(x, act, params)


# The fakes run the same aten code on fake tensors, so shapes and strides always agree.
inverted_forward.register_fake(_fake_forward)
inverted_backward.register_fake(_backward)
inverted_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
inverted_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
