"""Triton pieces shared by the few-bit and inverted kernels: the registry's activations
(the 19 torch ones and the 4 Hugging Face formulas), their closed-form derivatives in y,
dense bit packing, and launch helpers.

Precision. Half inputs are computed in fp32, like torch's opmath; float64 is not handled
here (the launchers send it to the torch implementation). To stay within 1 ulp of torch's
CUDA kernels the formulas follow theirs operation by operation, transcendental functions go
through libdevice (the CUDA math library torch's kernels also call), division and sqrt are
IEEE-rounded (`div_rn`, `sqrt_rn`; Triton's `/` and `sqrt` are approximate), and kernels are
compiled without automatic FMA contraction or flush-to-zero (`COMPILE_OPTIONS`); an explicit
fma stands where nvcc contracts torch's own kernel (gelu_tanh, fp32 tanh backward).

Under TRITON_INTERPRET=1 libdevice cannot run, so the five libdevice functions are replaced
by numpy evaluated in float64 and rounded to fp32: interpreter runs check the formulas,
masking and bit layout, not libdevice itself.

Bit layout: as `fewbit_fx.packing`, code i occupies bits [i*b, (i+1)*b) of a little-endian
bit stream. A program handles BLOCK elements viewed as (BLOCK/8, 8): each row of 8 codes is
one 8*b-bit word, i.e. exactly b whole bytes, so programs never share a byte.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from fewbit_fx.activations import SPECS, Activation, ClosedForm

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# No FMA contraction (torch's composite ops round every step) and no flush-to-zero in
# libdevice (torch is built without it). Ignored by the interpreter.
COMPILE_OPTIONS = {"enable_fp_fusion": False, "enable_reflect_ftz": False}
NUM_WARPS = 4
BLOCK = 1024  # elements per program; a power of two >= 8

# Activation ids (constexpr switches inside the kernels): each registry entry's Kernel.id.
ACT_IDS = {name: spec.kernel.id for name, spec in SPECS.items() if spec.kernel is not None}
GELU = tl.constexpr(ACT_IDS["gelu"])
GELU_TANH = tl.constexpr(ACT_IDS["gelu_tanh"])
SILU = tl.constexpr(ACT_IDS["silu"])
MISH = tl.constexpr(ACT_IDS["mish"])
SIGMOID = tl.constexpr(ACT_IDS["sigmoid"])
TANH = tl.constexpr(ACT_IDS["tanh"])
SOFTPLUS = tl.constexpr(ACT_IDS["softplus"])
ELU = tl.constexpr(ACT_IDS["elu"])  # ELU, SELU and CELU share torch's elu kernel
LEAKY_RELU = tl.constexpr(ACT_IDS["leaky_relu"])
RELU = tl.constexpr(ACT_IDS["relu"])
HARDTANH = tl.constexpr(ACT_IDS["hardtanh"])  # also relu6 = hardtanh(0, 6)
HARDSIGMOID = tl.constexpr(ACT_IDS["hardsigmoid"])
HARDSWISH = tl.constexpr(ACT_IDS["hardswish"])
LOGSIGMOID = tl.constexpr(ACT_IDS["logsigmoid"])
SOFTSIGN = tl.constexpr(ACT_IDS["softsign"])
TANHSHRINK = tl.constexpr(ACT_IDS["tanhshrink"])
# Hugging Face formula activations: chains of torch ops, each rounded to the tensor dtype.
GELU_TANH_FORMULA = tl.constexpr(ACT_IDS["gelu_tanh_formula"])
GELU_FAST_FORMULA = tl.constexpr(ACT_IDS["gelu_fast_formula"])
GELU_ERF_FORMULA = tl.constexpr(ACT_IDS["gelu_erf_formula"])
QUICK_GELU = tl.constexpr(ACT_IDS["quick_gelu"])

# Activations whose backward from y has a closed form (derivative_times_grad below). The
# rest (Numerical and Twin inverses) need fewbit_fx.inverse, so CUDA sends them to torch ops.
CLOSED_FORM_BACKWARD = frozenset(name for name in ACT_IDS if isinstance(SPECS[name].inverse, ClosedForm))

# The constants of torch's CUDA kernels (C macros, double), rounded to fp32 when used.
SQRT1_2 = tl.constexpr(0.70710678118654752440)
GELU_TANH_BETA = tl.constexpr(1.41421356237309504880 * 1.12837916709551257390 * 0.5)
GELU_TANH_KAPPA = tl.constexpr(0.044715)
ONE_SIXTH = tl.constexpr(float(np.float32(1.0) / np.float32(6.0)))
# The Python constants of the formula activations (fewbit_fx.activations), as torch uses
# them: cast to fp32; torch's CUDA division by a scalar multiplies by its fp32 reciprocal.
SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
INV_SQRT_2 = tl.constexpr(float(np.float32(1.0) / np.float32(math.sqrt(2.0))))


def _f32(v: float) -> float:
    """The fp32 value torch uses for a double Scalar (`Scalar.to<float>()`)."""
    return float(np.float32(v))


@functools.lru_cache(maxsize=None)  # on the launch path of every call
def kernel_params(act: Activation) -> tuple[int, float, float, float]:
    """(activation id, P0, P1, P2): the entry's Kernel.scalars with the fp32 values torch's
    kernels compute (softplus: beta, threshold; ELU family: poscoef, negcoef, negiptcoef;
    leaky_relu: slope; hardtanh: min, max)."""
    kernel = act.spec.kernel
    return (kernel.id, *(_f32(v) for v in kernel.scalars(act.p)))


def supported_activation(name: str) -> bool:
    """False for registry entries without a Kernel: CUDA runs them through the torch ops."""
    return name in ACT_IDS


def supported_dtype(dtype: torch.dtype) -> bool:
    return dtype in (torch.float32, torch.float16, torch.bfloat16)


def like_input(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`out` (contiguous, ref's shape) with the strides torch's elementwise op would give.

    The ops' fake implementations run torch's own elementwise ops, which keep the layout of
    a dense input (e.g. a transposed one); the real kernel must return the same strides.
    """
    if ref.is_contiguous():
        return out
    res = torch.empty_like(ref)
    res.copy_(out)
    return res


# --- math: libdevice on the GPU, float64 numpy under the interpreter --------------------
if INTERPRET:
    from triton.runtime.interpreter import TensorHandle

    def _np64(fn):
        def apply(x):
            with np.errstate(all="ignore"):
                data = fn(x.handle.data.astype(np.float64)).astype(np.float32)
            return tl.core.tensor(TensorHandle(data, x.handle.dtype.scalar), x.type)

        return apply

    def _bf16_bits(v: np.ndarray) -> np.ndarray:
        """fp32 -> bf16 bit patterns, round to nearest even (NaN kept quiet)."""
        bits = v.astype(np.float32).view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return np.where(np.isnan(v), np.uint16(0x7FC0), rounded).astype(np.uint16)

    def to_dtype(v, DTYPE):
        """v.to(DTYPE) rounding to nearest even: the interpreter's own fp32 -> bf16 cast
        truncates, which would make the checks disagree with the GPU by one bf16 ulp."""
        dtype = getattr(DTYPE, "value", DTYPE)
        if dtype == tl.float32:
            return v
        data = v.handle.data
        if dtype == tl.bfloat16:
            out = _bf16_bits(data)
        elif dtype == tl.float16:
            out = data.astype(np.float16)
        else:
            return v.to(dtype)
        ty = tl.block_type(dtype, v.type.shape) if v.type.is_block() else dtype
        return tl.core.tensor(TensorHandle(out, dtype), ty)

    _exp = _np64(np.exp)
    _expm1 = _np64(np.expm1)
    _log1p = _np64(np.log1p)
    _tanh = _np64(np.tanh)
    _erf = _np64(np.vectorize(math.erf, otypes=[np.float64]))
else:

    @triton.jit
    def to_dtype(v, DTYPE: tl.constexpr):
        """v.to(DTYPE): round to nearest even, as torch does."""
        return v.to(DTYPE)

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _expm1(x):
        return libdevice.expm1(x)

    @triton.jit
    def _log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def _tanh(x):
        return libdevice.tanh(x)

    @triton.jit
    def _erf(x):
        return libdevice.erf(x)


@triton.jit
def _round_to(v, DTYPE: tl.constexpr):
    """Round an fp32 intermediate to the tensor dtype, where torch's composite op does."""
    return to_dtype(v, DTYPE).to(tl.float32)


@triton.jit
def activation_forward(x, P0, P1, P2, ACT: tl.constexpr, DTYPE: tl.constexpr):
    """f(x) in fp32 for fp32 x, written like torch's CUDA kernel for the same op.

    DTYPE is the tensor dtype: softsign and tanhshrink are composite torch ops that round
    their intermediate results to it.
    """
    if ACT == GELU:
        y = x * 0.5 * (1.0 + _erf(x * SQRT1_2))
    elif ACT == GELU_TANH:
        # nvcc contracts x + kKappa * x_cube into an fma in torch's kernel
        inner = tl.math.fma(x * x * x, GELU_TANH_KAPPA, x) * GELU_TANH_BETA
        y = 0.5 * x * (1.0 + _tanh(inner))
    elif ACT == SILU:
        y = tl.math.div_rn(x, 1.0 + _exp(-x))
    elif ACT == MISH:
        y = x * _tanh(_log1p(_exp(x)))
    elif ACT == SIGMOID:
        y = tl.math.div_rn(1.0, 1.0 + _exp(-x))
    elif ACT == TANH:
        y = _tanh(x)
    elif ACT == SOFTPLUS:  # P0 = beta, P1 = threshold
        y = tl.where(x * P0 > P1, x, tl.math.div_rn(_log1p(_exp(x * P0)), P0))
    elif ACT == ELU:  # P0 = poscoef, P1 = negcoef, P2 = negiptcoef
        y = tl.where(x > 0, x * P0, _expm1(x * P2) * P1)
    elif ACT == LEAKY_RELU:
        y = tl.where(x > 0, x, x * P0)
    elif ACT == RELU:  # written so that NaN propagates, like torch's clamp_min
        y = tl.where(x < 0, 0.0, x)
    elif ACT == HARDTANH:  # P0 = min, P1 = max; NaN propagates like torch's clamp
        y = tl.where(x < P0, P0, tl.where(x > P1, P1, x))
    elif ACT == HARDSIGMOID:
        t = x + 3.0
        t = tl.where(t > 6.0, 6.0, tl.where(t < 0.0, 0.0, t))
        y = t * ONE_SIXTH
    elif ACT == HARDSWISH:
        t = x + 3.0
        t = tl.where(t > 6.0, 6.0, tl.where(t < 0.0, 0.0, t))
        y = x * t * ONE_SIXTH
    elif ACT == LOGSIGMOID:
        y = tl.minimum(x, 0.0) - _log1p(_exp(-tl.abs(x)))
    elif ACT == SOFTSIGN:  # x / (|x| + 1) in the tensor dtype
        y = tl.math.div_rn(x, _round_to(tl.abs(x) + 1.0, DTYPE))
    elif ACT == TANHSHRINK:  # x - tanh(x) in the tensor dtype
        y = x - _round_to(_tanh(x), DTYPE)
    elif ACT == GELU_TANH_FORMULA:
        # 0.5 * x * (1.0 + tanh(sqrt(2/pi) * (x + 0.044715 * pow(x, 3.0)))), op by op
        cube = _round_to(_round_to(x * x, DTYPE) * x, DTYPE)  # torch's pow(x, 3): base*base*base
        t = _round_to(x + _round_to(0.044715 * cube, DTYPE), DTYPE)
        t = _round_to(1.0 + _round_to(_tanh(_round_to(t * SQRT_2_OVER_PI, DTYPE)), DTYPE), DTYPE)
        y = _round_to(0.5 * x, DTYPE) * t
    elif ACT == GELU_FAST_FORMULA:
        # 0.5 * x * (1.0 + tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))), op by op
        inner = _round_to(1.0 + _round_to(_round_to(0.044715 * x, DTYPE) * x, DTYPE), DTYPE)
        inner = _round_to(_round_to(x * 0.7978845608, DTYPE) * inner, DTYPE)
        t = _round_to(1.0 + _round_to(_tanh(inner), DTYPE), DTYPE)
        y = _round_to(0.5 * x, DTYPE) * t
    elif ACT == GELU_ERF_FORMULA:
        # x * 0.5 * (1.0 + erf(x / sqrt(2))), op by op
        t = _round_to(_erf(_round_to(x * INV_SQRT_2, DTYPE)), DTYPE)
        y = _round_to(x * 0.5, DTYPE) * _round_to(1.0 + t, DTYPE)
    else:  # QUICK_GELU: x * sigmoid(1.702 * x), op by op
        s = tl.math.div_rn(1.0, 1.0 + _exp(-_round_to(1.702 * x, DTYPE)))
        y = x * _round_to(s, DTYPE)
    return y


@triton.jit
def mask_bit(x, BRANCH, P0, P1, ACT: tl.constexpr):
    """The saved bit of fewbit_fx.activations.Activation.mask_bit, from fp32 x."""
    if ACT == SOFTPLUS:  # torch's linear side, for either sign of beta
        bit = x * P0 > P1
    elif ACT == HARDTANH:  # torch's backward passes the gradient strictly inside
        bit = ~((x <= P0) | (x >= P1))
    elif ACT == HARDSWISH:  # NaN goes right: y = NaN then says x = NaN, not -inf
        bit = ~(x <= BRANCH)
    else:
        bit = x > BRANCH
    return bit


@triton.jit
def derivative_times_grad(
    g, y, right, P0, P1, P2, ACT: tl.constexpr, NEEDS_MASK: tl.constexpr, DTYPE: tl.constexpr
):
    """grad * f'(x) in fp32 from fp32 g, y and (non-monotone functions) the branch bit.

    Each line mirrors the registry's ClosedForm (fewbit_fx.activations.registry), including which torch
    backward kernel it reuses (sigmoid_backward, tanh_backward, elu_backward with
    is_result, threshold_backward, hardtanh_backward). torch's sigmoid_backward and
    tanh_backward compute in the tensor dtype (DTYPE), rounding every step for half types.
    """
    if ACT == SIGMOID:
        out = _round_to(g * _round_to(1.0 - y, DTYPE), DTYPE) * y
    elif ACT == TANH:
        if DTYPE == tl.float32:  # nvcc contracts 1 - y*y into an fma
            out = g * tl.math.fma(-y, y, 1.0)
        else:
            out = g * _round_to(1.0 - _round_to(y * y, DTYPE), DTYPE)
    elif ACT == SOFTPLUS:  # sigmoid(beta*x) = 1 - exp(-beta*y); 1 in the linear region
        if NEEDS_MASK:  # small threshold: the jump there makes y ambiguous, the bit decides
            linear = right != 0
        else:
            linear = y * P0 > P1
        out = g * tl.where(linear, 1.0, -_expm1(-P0 * y))
    elif ACT == ELU:
        # y + P1 >= 0: a half y saturated at -alpha*scale may round below it (bf16(-0.3))
        out = tl.where(y <= 0, g * P2 * tl.maximum(y + P1, 0.0), g * P0)
    elif ACT == LEAKY_RELU:
        if NEEDS_MASK:
            positive = right != 0
        else:
            positive = y > 0
        out = g * tl.where(positive, 1.0, P0)
    elif ACT == RELU:
        out = tl.where(y <= 0, 0.0, g)
    elif ACT == HARDTANH:
        if NEEDS_MASK:  # a bound rounded inward in the dtype: the bit is torch's "inside"
            out = tl.where(right != 0, g, 0.0)
        else:
            out = tl.where((y <= P0) | (y >= P1), 0.0, g)
    elif ACT == HARDSIGMOID:
        out = tl.where((y > 0) & (y < 1), g * ONE_SIXTH, 0.0)  # torch selects 0: NaN g too
    elif ACT == HARDSWISH:  # x = -3/2 +- sqrt(9 + 24 y)/2, f'(x) = (2x + 3)/6
        t = 9.0 + 24.0 * y
        t = tl.where(t < 0.0, 0.0, t)
        root = tl.math.sqrt_rn(t) * ONE_SIXTH  # torch's CUDA `/ 6.0` multiplies by fp32 1/6
        is_right = right != 0
        d = tl.where(is_right, root, -root)
        d = tl.where(is_right & (y >= 3.0), 1.0, d)  # identity region x >= 3
        out = tl.where((right == 0) & ~(y < 0.0), 0.0, g * d)  # flat: x <= -3, and x = -inf
    elif ACT == LOGSIGMOID:
        out = g * -_expm1(y)
    else:  # SOFTSIGN: (1 - |y|)^2
        t = 1.0 - tl.abs(y)
        out = g * (t * t)
    return out


# --- dense bit packing of a (G, 8) block of codes ----------------------------------------
@triton.jit
def store_packed(out_ptr, codes, pid, nbytes, BITS: tl.constexpr, G: tl.constexpr):
    """Pack a (G, 8) block of codes (< 2**BITS) into G*BITS bytes at block `pid`.

    Row r's 8 codes form one 8*BITS-bit word (code j at bit j*BITS), stored as BITS
    little-endian bytes at byte r*BITS of the block. Bytes at or past nbytes are skipped.
    """
    j = tl.arange(0, 8)
    word = tl.sum(codes.to(tl.int64) << (j[None, :] * BITS).to(tl.int64), axis=1)
    bytes_ = (word[:, None] >> (8 * j[None, :]).to(tl.int64)) & 0xFF
    rows = pid.to(tl.int64) * G + tl.arange(0, G)
    offs = rows[:, None] * BITS + j[None, :]
    tl.store(out_ptr + offs, bytes_.to(tl.uint8), mask=(j[None, :] < BITS) & (offs < nbytes))


@triton.jit
def load_packed(packed_ptr, pid, nbytes, BITS: tl.constexpr, G: tl.constexpr):
    """Inverse of store_packed: the (G, 8) int32 codes of block `pid` (missing bytes are 0)."""
    j = tl.arange(0, 8)
    rows = pid.to(tl.int64) * G + tl.arange(0, G)
    offs = rows[:, None] * BITS + j[None, :]
    b = tl.load(packed_ptr + offs, mask=(j[None, :] < BITS) & (offs < nbytes), other=0)
    word = tl.sum(b.to(tl.int64) << (8 * j[None, :]).to(tl.int64), axis=1)
    codes = (word[:, None] >> (j[None, :] * BITS).to(tl.int64)) & ((1 << BITS) - 1)
    return codes.to(tl.int32)


@triton.jit
def block_offsets(pid, n, G: tl.constexpr):
    """(G, 8) element offsets of block `pid` (int64: tensors may exceed 2**31) and mask."""
    offs = pid.to(tl.int64) * (G * 8) + tl.arange(0, G)[:, None] * 8 + tl.arange(0, 8)[None, :]
    return offs, offs < n
