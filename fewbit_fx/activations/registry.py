"""The registry: one `Spec` per activation (see spec.py for what each field means).

To add an activation, add its entry here (README: Adding an activation); detect, saves,
inverse and the kernels pick it up from this dict.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewbit_fx.activations import formulas
from fewbit_fx.activations.spec import ClosedForm, Kernel, Numerical, Params, Spec, Twin

SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_2 = math.sqrt(2.0)


# --- closed forms in y ----------------------------------------------------------------------
def _scaled(derivative: Callable[[Tensor, Tensor | None, Params], Tensor],
            flat: Callable[[Tensor, Tensor | None, Params], Tensor] | None = None) -> ClosedForm:
    """grad * f'(y) with f' evaluated in at least fp32, the result in grad's dtype.
    `flat`: where torch's backward selects 0 instead of multiplying (a NaN or inf
    gradient arriving there gives 0, not NaN)."""

    def grad_from_output(grad: Tensor, y: Tensor, right: Tensor | None, p: Params) -> Tensor:
        compute = torch.promote_types(y.dtype, torch.float32)
        y = y.to(compute)
        out = grad.to(compute) * derivative(y, right, p)
        if flat is not None:
            out = torch.where(flat(y, right, p), 0.0, out)
        return out.to(grad.dtype)

    return ClosedForm(grad_from_output)


def _softplus_from_output(y: Tensor, right: Tensor | None, p: Params) -> Tensor:
    """sigmoid(beta*x) = 1 - exp(-beta*y) below the threshold, 1 above it."""
    linear = right if right is not None else y * p["beta"] > p["threshold"]
    return torch.where(linear, torch.ones_like(y), -torch.expm1(-p["beta"] * y))


def _hardswish_from_output(y: Tensor, right: Tensor | None, p: Params) -> Tensor:
    root = torch.sqrt(torch.clamp(9.0 + 24.0 * y, min=0.0)) / 6.0
    inside = torch.where(right, root, -root)
    # Right branch: y >= 3 means x >= 3 (identity). Left branch: y == 0 means x <= -3.
    # y = NaN comes from x = NaN or -inf (-inf * 0); the bit tells them apart (see the
    # entry's mask_bit): NaN for x = NaN on the right, as torch's vectorised loop gives,
    # and 0 for x = -inf on the left.
    return torch.where(right & (y >= 3.0), torch.ones_like(y), inside)


def _hardswish_flat(y: Tensor, right: Tensor | None, p: Params) -> Tensor:
    """x <= -3 (y = 0 on the left branch) and x = -inf (y = NaN on the left)."""
    return ~right & ~(y < 0)


def _leaky_from_output(y: Tensor, right: Tensor | None, p: Params) -> Tensor:
    positive = (y > 0) if right is None else right
    slope = torch.full_like(y, p["negative_slope"])
    return torch.where(positive, torch.ones_like(y), slope)


def _elu_coefficients(p: Params, alpha: float, scale: float, input_scale: float):
    """(alpha, scale, input_scale) of torch's ELU-family kernels; input_scale 0 means 1/alpha."""
    a = p.get("alpha", alpha)
    return a, scale, input_scale if input_scale else 1.0 / a


def _elu_family(alpha: float, scale: float, input_scale: float) -> tuple[ClosedForm, Kernel]:
    """torch's own ELU-family backward in its is_result form, and the kernel's scalars
    (poscoef, negcoef, negiptcoef; negcoef = alpha * scale in fp32, as torch's kernel)."""

    def grad_from_output(grad: Tensor, y: Tensor, right: Tensor | None, p: Params) -> Tensor:
        a, s, i = _elu_coefficients(p, alpha, scale, input_scale)
        if y.dtype in (torch.float16, torch.bfloat16):
            # The saturated y rounds to the dtype's -alpha*scale, which may lie below the
            # real one (bf16(-0.3) = -0.30078): torch's result-based formula would give a
            # negative f'. In fp32, as torch's half kernel computes, with y kept at or above
            # it; elsewhere the same value as torch's, rounded once.
            y32 = torch.clamp_min(y.float(), -float(np.float32(a) * np.float32(s)))
            return torch.ops.aten.elu_backward(grad.float(), a, s, i, True, y32).to(grad.dtype)
        return torch.ops.aten.elu_backward(grad, a, s, i, True, y)

    def scalars(p: Params) -> tuple[float, float, float]:
        a, s, i = _elu_coefficients(p, alpha, scale, input_scale)
        return s, float(np.float32(a) * np.float32(s)), i

    return ClosedForm(grad_from_output), Kernel(7, scalars)  # one kernel branch for all three


def _hardtanh_from_output(lo: str | float, hi: str | float) -> ClosedForm:
    def grad_from_output(grad: Tensor, y: Tensor, right: Tensor | None, p: Params) -> Tensor:
        if right is not None:  # the saved bit is torch's own "strictly inside" test
            return grad.masked_fill(~right, 0)
        low, high = (p[v] if isinstance(v, str) else v for v in (lo, hi))
        return torch.ops.aten.hardtanh_backward(grad, y, low, high)

    return ClosedForm(grad_from_output)


# --- parameter-dependent branch facts -------------------------------------------------------
def _softplus_jump(p: Params) -> float | None:
    """torch switches to the identity for beta*x > threshold, where f jumps down by
    log1p(exp(-threshold))/beta; f' differs across by ~exp(-threshold). Only when that
    is visible in fp32 (>= 2^-24) does the side need a bit."""
    return p["threshold"] / p["beta"] if math.exp(-p["threshold"]) >= 2.0**-24 else None


def _check_softplus(p: Params) -> None:
    if not (math.isfinite(p["beta"]) and p["beta"] != 0):
        raise ValueError(f"Softplus beta must be a finite nonzero number, got {p['beta']!r}")


def _hardtanh_rounds_inward(p: Params, dtype: torch.dtype) -> bool:
    """A bound that rounds inward in the dtype (bf16(-0.7) > -0.7): the clamped output then
    equals an input torch does not clamp, so y alone cannot tell a zero gradient from a
    passed-through one."""
    return _bound_rounds_inward(p["min_val"], p["max_val"], dtype)


@functools.lru_cache(maxsize=None)
def _bound_rounds_inward(lo: float, hi: float, dtype: torch.dtype) -> bool:
    """Whether torch's hardtanh in `dtype` clamps to a value strictly inside the bounds
    its backward compares against (fp32 ones). Only half types round them further."""
    from fewbit_fx.activations import real_tensors

    if dtype not in (torch.float16, torch.bfloat16):
        return False
    with real_tensors():
        ends = F.hardtanh(torch.tensor([-math.inf, math.inf], dtype=dtype), lo, hi).float()
        bounds = torch.tensor([lo, hi], dtype=torch.float32)
        return bool(ends[0] > bounds[0]) or bool(ends[1] < bounds[1])


def _check_swish(p: Params) -> None:
    if not (math.isfinite(p["beta"]) and p["beta"] > 0):
        raise ValueError(f"swish beta must be a finite positive number, got {p['beta']!r}")


def _swish(x: Tensor, p: Params) -> Tensor:
    """x * sigmoid(beta * x); beta = 1 written without the multiply (1.0 * x is x, bit for bit)."""
    return x * torch.sigmoid(x if p["beta"] == 1.0 else p["beta"] * x)


_GELU_TANH_K, _GELU_TANH_C = _SQRT_2_OVER_PI, 0.044715


def _check_gelu_tanh_constants(p: Params) -> None:
    """Written-out tanh GELUs with their constants spelled otherwise (0.7978845608,
    0.79788456): gelu_tanh's inverse serves them while the constants agree to 1e-7
    relative, which moves f' by < 1e-7 (the fp32 floor away from the minimum)."""
    for name, want in (("k", _GELU_TANH_K), ("c", _GELU_TANH_C)):
        if not abs(p[name] / want - 1.0) <= 1e-7:
            raise ValueError(f"a tanh GELU formula with {name}={p[name]!r} is not GELU's ({want!r})")


def _gelu_python(module: nn.Module) -> bool:
    """GELUActivation(use_gelu_python=True) computes the erf formula, not F.gelu."""
    return getattr(module, "act", F.gelu) is not F.gelu


_ELU, _ELU_KERNEL = _elu_family(1.0, 1.0, 1.0)
_SELU, _SELU_KERNEL = _elu_family(SELU_ALPHA, SELU_SCALE, 1.0)
_CELU, _CELU_KERNEL = _elu_family(1.0, 1.0, 0.0)

def _gelu_tanh_spelling(forward) -> Spec:
    """A tanh GELU written with its constants k, c as parameters (GELU's to 1e-7)."""
    return Spec(
        forward=forward,
        inverse=Twin("gelu_tanh"),
        params=(("k", _GELU_TANH_K), ("c", _GELU_TANH_C)),
        check=_check_gelu_tanh_constants,
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        formula=True,
    )


SPECS: dict[str, Spec] = {
    "gelu": Spec(
        forward=lambda x, p: F.gelu(x),
        inverse=Numerical(formulas.gelu, formulas.gelu_slope, x_end=8.5),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        functions={F.gelu: ("approximate",)},
        variants={"approximate": {"tanh": "gelu_tanh"}},
        modules=(nn.GELU,),
        hf_classes=("GELUActivation",),
        hf_accepts=lambda m: not _gelu_python(m),
        kernel=Kernel(0),
    ),
    "gelu_tanh": Spec(  # F.gelu(x, approximate="tanh"), nn.GELU("tanh"): gelu's variants
        forward=lambda x, p: F.gelu(x, approximate="tanh"),
        inverse=Numerical(formulas.gelu_tanh, formulas.gelu_tanh_slope, x_end=8.0),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        hf_classes=("GELUTanh", "PytorchGELUTanh"),
        kernel=Kernel(1),
    ),
    "silu": Spec(
        forward=lambda x, p: F.silu(x),
        inverse=Numerical(formulas.silu, formulas.silu_slope, x_end=40.0),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        functions={F.silu: ("inplace",)},
        modules=(nn.SiLU,),
        hf_classes=("SiLUActivation",),
        kernel=Kernel(2),
    ),
    "mish": Spec(
        forward=lambda x, p: F.mish(x),
        inverse=Numerical(formulas.mish, formulas.mish_slope, x_end=20.0),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        functions={F.mish: ("inplace",)},
        modules=(nn.Mish,),
        hf_classes=("MishActivation",),
        # its python fallback (old torch): not worth a formula entry
        hf_accepts=lambda m: getattr(m, "act", F.mish) is F.mish,
        kernel=Kernel(3),
    ),
    "sigmoid": Spec(
        forward=lambda x, p: torch.sigmoid(x),
        inverse=ClosedForm(lambda g, y, r, p: torch.ops.aten.sigmoid_backward(g, y)),
        functions={torch.sigmoid: (), F.sigmoid: ()},
        inplace_functions={torch.sigmoid_: ()},
        methods=("sigmoid",),
        inplace_methods=("sigmoid_",),
        modules=(nn.Sigmoid,),
        saves_result=True,
        kernel=Kernel(4),
    ),
    "tanh": Spec(
        forward=lambda x, p: torch.tanh(x),
        inverse=ClosedForm(lambda g, y, r, p: torch.ops.aten.tanh_backward(g, y)),
        functions={torch.tanh: (), F.tanh: ()},
        inplace_functions={torch.tanh_: ()},
        methods=("tanh",),
        inplace_methods=("tanh_",),
        modules=(nn.Tanh,),
        saves_result=True,
        kernel=Kernel(5),
    ),
    "softplus": Spec(
        forward=lambda x, p: F.softplus(x, p["beta"], p["threshold"]),
        # sigmoid(beta*x) = 1 - exp(-beta*y); in the linear region beta*y > threshold it is 1.
        inverse=_scaled(_softplus_from_output),
        params=(("beta", 1.0), ("threshold", 20.0)),
        check=_check_softplus,
        kinks=lambda p: [p["threshold"] / p["beta"]],
        ambiguous_at=_softplus_jump,
        mask_bit=lambda x, p, branch: x * p["beta"] > p["threshold"],  # torch's test, either sign of beta
        functions={F.softplus: ("beta", "threshold")},
        modules=(nn.Softplus,),
        kernel=Kernel(6, lambda p: (p["beta"], p["threshold"], 0.0)),
    ),
    "elu": Spec(
        forward=lambda x, p: F.elu(x, p["alpha"]),
        inverse=_ELU,
        params=(("alpha", 1.0),),
        monotone=lambda p: p["alpha"] >= 0,
        x_min=0.0,
        kinks=lambda p: [0.0],
        functions={F.elu: ("alpha", "inplace")},
        inplace_functions={F.elu_: ("alpha",)},
        modules=(nn.ELU,),
        saves_result_inplace=True,
        kernel=_ELU_KERNEL,
    ),
    "selu": Spec(
        forward=lambda x, p: F.selu(x),
        inverse=_SELU,
        kinks=lambda p: [0.0],
        functions={torch.selu: (), F.selu: ("inplace",)},
        modules=(nn.SELU,),
        saves_result_inplace=True,
        kernel=_SELU_KERNEL,
    ),
    "celu": Spec(
        forward=lambda x, p: F.celu(x, p["alpha"]),
        inverse=_CELU,
        params=(("alpha", 1.0),),
        monotone=lambda p: p["alpha"] > 0,
        x_min=0.0,
        kinks=lambda p: [0.0],
        functions={F.celu: ("alpha", "inplace")},
        modules=(nn.CELU,),
        saves_result_inplace=True,
        kernel=_CELU_KERNEL,
    ),
    "leaky_relu": Spec(
        forward=lambda x, p: F.leaky_relu(x, p["negative_slope"]),
        inverse=_scaled(_leaky_from_output),
        params=(("negative_slope", 0.01),),
        monotone=lambda p: p["negative_slope"] >= 0,
        x_min=0.0,
        kinks=lambda p: [0.0],
        nan_derivative="never",
        functions={F.leaky_relu: ("negative_slope", "inplace")},
        modules=(nn.LeakyReLU,),
        saves_result_inplace=True,  # leaky_relu_ keeps its result (leaky_relu keeps x)
        kernel=Kernel(8, lambda p: (p["negative_slope"], 0.0, 0.0)),
    ),
    "relu": Spec(
        forward=lambda x, p: F.relu(x),
        inverse=ClosedForm(lambda g, y, r, p: torch.ops.aten.threshold_backward(g, y, 0)),
        kinks=lambda p: [0.0],
        nan_derivative="never",
        functions={F.relu: ("inplace",), torch.relu: ()},
        inplace_functions={torch.relu_: (), F.relu_: ()},
        methods=("relu",),
        inplace_methods=("relu_",),
        modules=(nn.ReLU,),
        saves_result=True,
        kernel=Kernel(9),
    ),
    "relu6": Spec(
        forward=lambda x, p: F.relu6(x),
        inverse=_hardtanh_from_output(0.0, 6.0),
        kinks=lambda p: [0.0, 6.0],
        nan_derivative="never",
        functions={F.relu6: ("inplace",)},
        modules=(nn.ReLU6,),
        kernel=Kernel(10, lambda p: (0.0, 6.0, 0.0)),  # hardtanh's branch
    ),
    "hardtanh": Spec(
        forward=lambda x, p: F.hardtanh(x, p["min_val"], p["max_val"]),
        inverse=_hardtanh_from_output("min_val", "max_val"),
        params=(("min_val", -1.0), ("max_val", 1.0)),
        kinks=lambda p: [p["min_val"], p["max_val"]],
        # torch's backward passes the gradient strictly inside
        mask_bit=lambda x, p, branch: ~((x <= p["min_val"]) | (x >= p["max_val"])),
        mask_for_dtype=_hardtanh_rounds_inward,
        nan_derivative="never",
        functions={F.hardtanh: ("min_val", "max_val", "inplace")},
        modules=(nn.Hardtanh,),
        kernel=Kernel(10, lambda p: (p["min_val"], p["max_val"], 0.0)),
    ),
    "hardsigmoid": Spec(
        forward=lambda x, p: F.hardsigmoid(x),
        # Slope 1/6 strictly inside (-3, 3), where 0 < y < 1.
        inverse=_scaled(lambda y, r, p: torch.full_like(y, 1.0 / 6.0),
                        flat=lambda y, r, p: ~((y > 0) & (y < 1))),
        kinks=lambda p: [-3.0, 3.0],
        nan_derivative="never",
        functions={F.hardsigmoid: ("inplace",)},
        modules=(nn.Hardsigmoid,),
        kernel=Kernel(11),
    ),
    "hardswish": Spec(
        forward=lambda x, p: F.hardswish(x),
        inverse=_scaled(_hardswish_from_output, flat=_hardswish_flat),
        monotone=lambda p: False,
        x_min=-1.5,
        kinks=lambda p: [-3.0, 3.0],
        mask_bit=lambda x, p, branch: ~(x <= branch),  # NaN goes right: y = NaN then says x = NaN, not -inf
        functions={F.hardswish: ("inplace",)},
        modules=(nn.Hardswish,),
        kernel=Kernel(12),
    ),
    "logsigmoid": Spec(
        forward=lambda x, p: F.logsigmoid(x),
        inverse=_scaled(lambda y, r, p: -torch.expm1(y)),
        functions={F.logsigmoid: ()},
        modules=(nn.LogSigmoid,),
        kernel=Kernel(13),
    ),
    "softsign": Spec(
        forward=lambda x, p: F.softsign(x),
        inverse=_scaled(lambda y, r, p: (1.0 - y.abs()) ** 2),
        nan_derivative="nonfinite",
        functions={F.softsign: ()},
        modules=(nn.Softsign,),
        kernel=Kernel(14),
    ),
    "tanhshrink": Spec(
        forward=lambda x, p: F.tanhshrink(x),
        inverse=Numerical(formulas.tanhshrink, formulas.tanhshrink_slope, x_end=20.0),
        functions={F.tanhshrink: ()},
        modules=(nn.Tanhshrink,),
        kernel=Kernel(15),
    ),
    # Hugging Face formula activations, written exactly as transformers.activations does.
    "gelu_tanh_formula": Spec(
        forward=lambda x, p: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
        inverse=Twin("gelu_tanh"),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        hf_classes=("NewGELUActivation",),
        formula=True,
        kernel=Kernel(16),
    ),
    "gelu_fast_formula": Spec(
        forward=lambda x, p: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
        inverse=Twin("gelu_tanh"),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        hf_classes=("FastGELUActivation",),
        formula=True,
        kernel=Kernel(17),
    ),
    "gelu_erf_formula": Spec(  # GELUActivation(use_gelu_python=True)
        forward=lambda x, p: x * 0.5 * (1.0 + torch.erf(x / _SQRT_2)),
        inverse=Twin("gelu"),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        hf_classes=("GELUActivation",),
        hf_accepts=_gelu_python,
        formula=True,
        kernel=Kernel(18),
    ),
    "quick_gelu": Spec(  # x * sigmoid(1.702 x) = silu(1.702 x) / 1.702
        forward=lambda x, p: x * torch.sigmoid(1.702 * x),
        inverse=Twin("silu", 1.702),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        hf_classes=("QuickGELUActivation",),
        formula=True,
        kernel=Kernel(19),
    ),
    # Formulas found in users' own code by graph pattern (passes/formulas), each the op
    # sequence users write, with its constants as parameters where they vary.
    "swish": Spec(  # x * sigmoid(beta x) = silu(beta x) / beta; beta = 1 is SiLU written out
        forward=_swish,
        inverse=Twin("silu", "beta"),
        params=(("beta", 1.0),),
        check=_check_swish,
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        formula=True,
    ),
    "mish_formula": Spec(
        forward=lambda x, p: x * torch.tanh(F.softplus(x)),
        inverse=Twin("mish"),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
        formula=True,
    ),
    # NewGELU's spelling with other constants; the cube as c * x * x * x; FastGELU's (and
    # Megatron's) spelling
    "gelu_tanh_pow_formula": _gelu_tanh_spelling(
        lambda x, p: 0.5 * x * (1.0 + torch.tanh(p["k"] * (x + p["c"] * torch.pow(x, 3.0))))),
    "gelu_tanh_cube_formula": _gelu_tanh_spelling(
        lambda x, p: 0.5 * x * (1.0 + torch.tanh(p["k"] * (x + p["c"] * x * x * x)))),
    "gelu_tanh_fast_formula": _gelu_tanh_spelling(
        lambda x, p: 0.5 * x * (1.0 + torch.tanh(x * p["k"] * (1.0 + p["c"] * x * x)))),
}
