"""Inverted normalization as custom ops: LayerNorm / RMSNorm whose backward keeps the
output y (which the next layer keeps anyway) plus per-row statistics, instead of x.

Backward recovers x_hat = (y - beta) / gamma per channel and runs the standard norm
backward. Tempo recomputed LayerNorm from its output the same way and broke where
gamma ~ 0; here a guard, evaluated per call (gamma and beta train), picks the channels
that y cannot tell and keeps x's columns for those (a small side tensor), or all of x
when most channels are unsafe.

The guard (channel j, over the call's rows i; y is the stored, rounded output):

    s_j = max_i |y_ij - beta_j|                   (from y's column min and max)
    safe_j  <=>  gamma_j != 0, s_j finite, s_j >= tiny(y.dtype), |beta_j| <= s_j

Why: an exact inverse of the stored y errs by u|y_ij| / |gamma_j| (u: y's unit roundoff),
and |y_ij| <= s_j + |beta_j| <= 2 s_j. So every recovered x_hat of a safe column is
within 2x the column's floor u * max_i |gamma_j x_hat_ij| / |gamma_j|, which is what an
exact inverse of a rounded y achieves without the offset beta (the subtraction y - beta
costs at most one bit). s_j >= tiny keeps the column's largest value out of the
subnormal range, where rounding is absolute and a tiny gamma would lose x_hat
(gamma = 0 makes s_j = 0). RMSNorm has beta = 0: the guard only catches gamma = 0,
underflow and non-finite columns, and y / gamma keeps y's relative accuracy.

Five formulas (`kind`):
  "layer_norm"   torch.nn.functional.layer_norm, bitwise (torch.native_layer_norm)
  "rms_norm"     torch.nn.functional.rms_norm, bitwise
  "hf_rms_norm"  Hugging Face's RMSNorm written as aten ops (Llama, Mistral, Qwen2):
                 h = x.to(float32); h = h * rsqrt(h.pow(2).mean(-1, keepdim=True) + eps);
                 weight * h.to(x.dtype)   (last dim only; the multiply after the cast back)
  "t5_rms_norm"  T5's spelling of it (T5LayerNorm, also LongT5, MT5, UMT5, Pix2Struct):
                 r = rsqrt(x.to(float32).pow(2).mean(-1, keepdim=True) + eps);
                 h = x * r (x's dtype promoted with fp32, no cast back to x's dtype);
                 h.to(weight.dtype) only for half weights; weight * h. The same bits as
                 hf_rms_norm where x and weight share a dtype; not for half x with fp32
                 weight (fp32 out, unrounded) or fp32 x with half weight (half out).
  "uncast_rms_norm"  the same written without casts, all in x's dtype:
                 r = rsqrt(x.pow(2).mean(-1, keepdim=True) + eps); weight * (x * r).
                 hf_rms_norm's bits in fp32; in half types its statistics are half too.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fewbit_fx.ops._common import CHUNK, check_input, compare_dtype, no_double_backward, refuse_create_graph
from fewbit_fx.kernels import cpu as cpu_kernels

KINDS = ("layer_norm", "rms_norm", "hf_rms_norm", "t5_rms_norm", "uncast_rms_norm")
LAST_DIM = ("hf_rms_norm", "t5_rms_norm", "uncast_rms_norm")  # RMSNorms written as aten ops
HALF = (torch.float16, torch.bfloat16)


@torch.library.custom_op("fewbit_fx::inverted_norm_forward", mutates_args=())
def inverted_norm_forward(
    x: Tensor, kind: str, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
    eps: float | None, allow_whole: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, rstd, side, idx): y exactly as torch's norm; per-row mean (LayerNorm
    only, else empty) and rstd in fp32 or wider; idx the unsafe channels (flattened over
    normalized_shape) and side = x's columns there, shape (rows, len(idx)).
    allow_whole: when most channels are unsafe, side is returned with 0 columns instead
    and the autograd wrapper saves x itself (no copy); only where shapes may depend on
    data and the caller can see real sizes (eager), never in a traced graph."""
    return _forward(x, kind, normalized_shape, weight, bias, eps, allow_whole)


def _forward(x, kind, normalized_shape, weight, bias, eps, allow_whole, gather=None):
    """`gather(x2, idx)` takes x's unsafe columns (default: index_select)."""
    _check(x, kind, normalized_shape, weight, bias)
    n = math.prod(normalized_shape)
    y, mean, rstd = _output_and_statistics(x, kind, normalized_shape, weight, bias, eps)
    idx = unsafe_channels(y, len(normalized_shape), weight, bias).nonzero().view(-1)
    rows = x.numel() // n if n else 0
    if allow_whole and 2 * idx.numel() > n:
        return y, mean, rstd, x.new_empty((rows, 0)), idx
    x2 = x.reshape(rows, n)
    return y, mean, rstd, (gather(x2, idx) if gather else x2.index_select(1, idx)), idx


def _forward_compiled(x, kind, normalized_shape, weight, bias, eps, allow_whole):
    """Inductor's version: a traced graph never switches to saving all of x, and x's
    unsafe columns are gathered by an op the partitioner cannot recompute (gather_columns),
    so that it saves those columns and not all of x to gather them again in backward
    (it sizes the data-dependent side by a large fallback guess and would pick x)."""
    return _forward(x, kind, normalized_shape, weight, bias, eps, False,
                    gather=torch.ops.fewbit_fx.gather_columns)


@torch.library.custom_op("fewbit_fx::gather_columns", mutates_args=())
def gather_columns(x: Tensor, idx: Tensor) -> Tensor:
    """x[:, idx] as a new tensor: an opaque op for the partitioner (see _forward_compiled)."""
    return x.index_select(1, idx)


@gather_columns.register_fake
def _(x, idx):
    return x.new_empty((x.shape[0], idx.shape[0]))


def _check(x, kind, normalized_shape, weight, bias):
    check_input(x, "Inverted norm")
    if kind not in KINDS:
        raise ValueError(f"fewbit-fx: unknown norm kind {kind!r}; expected one of {KINDS}")
    nd = len(normalized_shape)
    if nd == 0 or x.dim() < nd or tuple(x.shape[x.dim() - nd:]) != tuple(normalized_shape):
        raise ValueError(f"fewbit-fx: normalized_shape {list(normalized_shape)} does not match the "
                         f"input's trailing dims {list(x.shape)}")
    if kind in LAST_DIM and nd != 1:
        raise ValueError(f"fewbit-fx: {kind} normalizes over the last dim only")
    if kind != "layer_norm" and bias is not None:
        raise ValueError("fewbit-fx: an RMSNorm has no bias")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (not p.is_floating_point() or tuple(p.shape) != tuple(normalized_shape)):
            raise ValueError(f"fewbit-fx: the norm's {name} must be a float tensor of shape "
                             f"{list(normalized_shape)}, got {p.dtype} {list(p.shape)}")


def default_eps(kind: str, dtype: torch.dtype) -> float:
    """torch.rms_norm's eps=None: the epsilon of its compute type (fp32 for half inputs)."""
    return torch.finfo(compare_dtype(dtype) if kind == "rms_norm" else torch.float32).eps


def plain_norm(x, kind, normalized_shape, weight, bias, eps):
    """The formula itself, as torch computes it (the modules' no-grad path)."""
    if kind == "layer_norm":
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    if kind == "rms_norm":
        return F.rms_norm(x, normalized_shape, weight, eps)
    if kind == "t5_rms_norm":
        return _t5_output(x, weight, torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps))
    if kind == "uncast_rms_norm":
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h if weight is not None else h
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    h = h.to(x.dtype)
    return weight * h if weight is not None else h


def _t5_output(x, weight, rstd):
    h = x * rstd
    if weight is not None and weight.dtype in HALF:
        h = h.to(weight.dtype)
    return weight * h if weight is not None else h


def _output_and_statistics(x, kind, normalized_shape, weight, bias, eps):
    dims = tuple(range(-len(normalized_shape), 0))
    empty = x.new_empty(0, dtype=torch.float32)
    if kind == "layer_norm":
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        if mean.dtype != compare_dtype(x.dtype):  # half weights: torch rounds them to half
            var, mean = torch.var_mean(x.to(compare_dtype(x.dtype)), dim=dims, correction=0, keepdim=True)
            rstd = torch.rsqrt(var + eps)
        return y, mean, rstd
    if kind == "rms_norm":
        y = F.rms_norm(x, normalized_shape, weight, eps)
        e = default_eps(kind, x.dtype) if eps is None else eps
        rstd = torch.rsqrt(x.to(compare_dtype(x.dtype)).pow(2).mean(dims, keepdim=True) + e)
        return y, empty, rstd
    if kind == "uncast_rms_norm":
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # in x's dtype, as it computes
        h = x * rstd
        return (weight * h if weight is not None else h), empty, rstd
    h = x.to(torch.float32)
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if kind == "t5_rms_norm":
        return _t5_output(x, weight, rstd), empty, rstd
    h = (h * rstd).to(x.dtype)
    return (weight * h if weight is not None else h), empty, rstd


def unsafe_channels(y: Tensor, nd: int, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Bool, one per channel of the flattened normalized shape: the channels the module
    docstring's guard refuses to recover from y."""
    n = math.prod(y.shape[y.dim() - nd:])
    y2 = y.reshape(-1, n)
    dt = _compute_dtype(y.dtype, weight)
    if y2.shape[0] == 0:
        return torch.zeros(n, dtype=torch.bool, device=y.device)
    lo, hi = y2.amin(0), y2.amax(0)  # aminmax(dim=0) is ~10x slower on CPU
    lo, hi = lo.to(dt), hi.to(dt)
    beta = bias.reshape(n).to(dt) if bias is not None else None
    if beta is not None:
        lo, hi = lo - beta, hi - beta
    s = torch.maximum(hi.abs(), lo.abs())  # NaN in -> NaN out: fails every test below
    safe = torch.isfinite(s) & (s >= torch.finfo(y.dtype).tiny)
    if beta is not None:
        safe = safe & (beta.abs() <= s)  # out of place: decompositions must stay functional
    if weight is not None:
        gamma = weight.reshape(n)
        safe = safe & (gamma != 0) & torch.isfinite(gamma)
    return ~safe


def _compute_dtype(dtype: torch.dtype, weight: Tensor | None) -> torch.dtype:
    dt = compare_dtype(dtype)
    return dt if weight is None else torch.promote_types(dt, weight.dtype)


@torch.library.custom_op("fewbit_fx::inverted_norm_backward", mutates_args=())
def inverted_norm_backward(
    grad: Tensor, y: Tensor, mean: Tensor, rstd: Tensor, side: Tensor, idx: Tensor,
    weight: Tensor | None, bias: Tensor | None, kind: str, nd: int, whole: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) with x_hat recovered from y, the unsafe
    channels' (or with `whole`, all) x_hat from side; empty gradients for absent params."""
    # Eager, idx is concrete: with every channel safe (the usual case) the column
    # joins are left out, which are ~3/4 of the compiled kernel's time on CPU.
    all_safe = not whole and idx.numel() == 0
    if cpu_kernels.usable(grad):
        out = _compiled_backward(grad, y, mean, rstd, side, idx, weight, bias, kind, nd, whole, all_safe)
        if out is not None:
            return out
    n = math.prod(y.shape[y.dim() - nd:])
    rows = y.numel() // n if n else 0
    step = max(1, CHUNK // max(n, 1))
    if rows <= step or not (grad.is_contiguous() and y.is_contiguous()):
        return _backward(grad, y, mean, rstd, side, idx, weight, bias, kind, nd, whole, all_safe)
    # Eager: a block of rows at a time, so the fp32 temporaries stay small.
    g2, y2, s2 = grad.reshape(rows, n), y.reshape(rows, n), side.reshape(rows, -1)
    mean2 = mean.reshape(rows, 1) if mean.numel() else mean
    rstd2 = rstd.reshape(rows, 1)
    gx = torch.empty(rows, n, dtype=side.dtype, device=y.device)
    gw = gb = None
    for s in range(0, rows, step):
        e = min(s + step, rows)
        part = _backward_2d(g2[s:e], y2[s:e], mean2[s:e] if mean.numel() else mean, rstd2[s:e],
                            s2[s:e], idx, weight, bias, kind, whole, all_safe)
        gx[s:e] = part[0]
        gw = part[1] if gw is None else gw + part[1]
        gb = part[2] if gb is None else gb + part[2]
    return gx.view(y.shape), *_param_grads(gw, gb, weight, bias)


def _compiled_backward(grad, y, mean, rstd, side, idx, weight, bias, kind, nd, whole, all_safe):
    """_backward as one Inductor-compiled C++ kernel (fewbit_fx.kernels.cpu): the torch-op
    version is dozens of passes over the block, 2x a GPT-2 step's time; None if that
    failed (the caller then takes the torch ops)."""
    has_w, has_b = weight is not None, bias is not None

    def make():
        def fn(g, y, m, r, s, i, *params):
            rest = iter(params)
            w = next(rest) if has_w else None
            b = next(rest) if has_b else None
            return _backward(g, y, m, r, s, i, w, b, kind, nd, whole, all_safe)
        return fn

    tensors = [t for t in (weight, bias) if t is not None]
    return cpu_kernels.run(("inverted_norm_backward", kind, nd, whole, all_safe, has_w, has_b), make,
                           grad, y, mean, rstd, side, idx, *tensors)


def _backward(grad, y, mean, rstd, side, idx, weight, bias, kind, nd, whole, all_safe=False):
    n = math.prod(y.shape[y.dim() - nd:])
    rows = y.numel() // n if n else 0
    gx, gw, gb = _backward_2d(
        grad.reshape(rows, n), y.reshape(rows, n),
        mean.reshape(rows, 1) if kind == "layer_norm" else mean, rstd.reshape(rows, 1),
        side.reshape(rows, -1), idx, weight, bias, kind, whole, all_safe)
    return gx.view(y.shape), *_param_grads(gw, gb, weight, bias)


def _param_grads(gw, gb, weight, bias):
    # Separate empties: a custom op's outputs must not alias each other.
    return (gw.to(weight.dtype).view(weight.shape) if weight is not None else gw.new_empty(0),
            gb.to(bias.dtype).view(bias.shape) if bias is not None else gb.new_empty(0))


def _backward_2d(g, y, mean, rstd, side, idx, weight, bias, kind, whole, all_safe=False):
    """The norm backward on (rows, n) blocks; gradient sums over the rows unreduced
    across blocks. Returns grad_input in x's dtype (side's), param grads in the compute
    dtype.

    x_hat's unsafe columns (idx) come from side and are combined with the rest only in
    terms that read the gradient: a graph partitioner moves work that reads forward values
    alone into the forward and saves its result, so a full x_hat built from y and side
    would be saved beside y (measured: torch.compile kept a second copy of the norm's size).
    all_safe: idx is known to be empty (eager calls only), so the joins are left out."""
    dt = _compute_dtype(y.dtype, weight)
    n = y.shape[1]
    gamma = weight.reshape(n).to(dt) if weight is not None else None
    r = rstd.to(dt)
    exact = side.to(dt)  # x's columns -> their x_hat, as the forward computed it
    exact = (exact - mean.to(dt)) * r if kind == "layer_norm" else exact * r
    # HF rounds x_hat to x's dtype before the weight multiply (uncast too, T5 to a half weight's):
    # grad_weight sees that rounded value (y / gamma recovers it), grad_input the unrounded one.
    rounding = (side.dtype if kind in ("hf_rms_norm", "uncast_rms_norm") else
                weight.dtype if kind == "t5_rms_norm" and weight is not None and weight.dtype in HALF
                else None)
    exact_w = exact.to(rounding).to(dt) if rounding is not None else exact
    gdt = g.to(dt)
    gh = gdt * gamma if gamma is not None else gdt
    if kind == "layer_norm":  # LayerNorm's backward also takes out the mean of gh per row
        mean_gh = gh.mean(1, keepdim=True)
        centred = lambda t: t - mean_gh  # noqa: E731
    else:
        centred = lambda t: t  # noqa: E731
    if whole:
        proj = (gh * exact).mean(1, keepdim=True)
        gx = r * (centred(gh) - exact * proj)
        gw = (gdt * exact_w).sum(0) if weight is not None else None
    else:
        xhat = y.to(dt)  # the safe columns, recovered from y; the unsafe ones zeroed
        if bias is not None:
            xhat = xhat - bias.reshape(n).to(dt)
        if gamma is not None:
            xhat = xhat / gamma
    if all_safe:
        proj = (gh * xhat).sum(1, keepdim=True) / n
        gx = r * (centred(gh) - xhat * proj)
        gw = (gdt * xhat).sum(0) if weight is not None else None
    elif not whole:
        unsafe = torch.zeros(n, dtype=torch.bool, device=y.device).index_fill(0, idx, True)
        xhat = torch.where(unsafe, 0.0, xhat)
        gh_u, g_u = gh.index_select(1, idx), gdt.index_select(1, idx)
        proj = ((gh * xhat).sum(1, keepdim=True) + (gh_u * exact).sum(1, keepdim=True)) / n
        gx = r * (centred(gh) - xhat * proj)
        gx_u = r * (centred(gh_u) - exact * proj)
        gx = gx.index_copy(1, idx, gx_u)
        gw = ((gdt * xhat).sum(0).index_copy(0, idx, (g_u * exact_w).sum(0))
              if weight is not None else None)
    gb = gdt.sum(0) if bias is not None else None
    if gw is None:
        gw = gx.new_empty(0)
    if gb is None:
        gb = gx.new_empty(0)
    return gx.to(side.dtype), gw, gb


def _setup_context(ctx, inputs, output):
    x, ctx.kind, shape, weight, bias, _, allow_whole = inputs
    y, mean, rstd, side, idx = output
    ctx.nd = len(shape)
    # Eager only (allow_whole): a side with fewer columns than unsafe channels means "all of x".
    ctx.whole = bool(allow_whole) and side.shape[-1] != idx.shape[0]
    ctx.save_for_backward(y, mean, rstd, x if ctx.whole else side, idx, weight, bias)
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad_y, *_):
    refuse_create_graph()
    if grad_y is None:
        return None, None, None, None, None, None, None
    y, mean, rstd, side, idx, weight, bias = ctx.saved_tensors
    gx, gw, gb = inverted_norm_backward(grad_y.contiguous(), y, mean, rstd, side, idx, weight, bias,
                                        ctx.kind, ctx.nd, ctx.whole)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, None, None, gw if weight is not None and need[3] else None,
            gb if bias is not None and need[4] else None, None, None)


def _fake_forward(x, kind, normalized_shape, weight, bias, eps, allow_whole):
    from fewbit_fx.ops import inductor

    inductor.register()  # a trace is under way: the compiler may come next
    _check(x, kind, normalized_shape, weight, bias)
    y, mean, rstd = _output_and_statistics(x, kind, normalized_shape, weight, bias, eps)
    n = math.prod(normalized_shape)
    ctx = torch.library.get_ctx()
    k = ctx.new_dynamic_size(min=0, max=n)  # how many channels are unsafe: data-dependent
    side_k = ctx.new_dynamic_size(min=0, max=n) if allow_whole else k
    rows = x.numel() // n
    return y, mean, rstd, x.new_empty((rows, side_k)), x.new_empty(k, dtype=torch.long)


inverted_norm_forward.register_fake(_fake_forward)
inverted_norm_backward.register_fake(_backward)
inverted_norm_forward.register_autograd(_autograd_backward, setup_context=_setup_context)
inverted_norm_backward.register_autograd(no_double_backward, setup_context=lambda ctx, inputs, output: None)
