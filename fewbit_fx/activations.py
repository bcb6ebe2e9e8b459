"""Registry of the pointwise nonlinearities fewbit-fx can rewrite.

One `Activation` per function and parameter set. It knows the exact forward (the torch op
itself, so rewritten models compute bit-identical outputs), the derivative as a function of
the input (used to fit few-bit tables and as a reference), the derivative as a function of
the *output* (the inverted method), where the minimum is for non-monotone functions, and
where the derivative jumps (few-bit borders must land there).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_SQRT_2 = math.sqrt(2.0)


@dataclass(frozen=True)
class Activation:
    """A nonlinearity with fixed parameters. Hashable: it keys the table cache."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    # --- registry lookups -------------------------------------------------------------
    @property
    def spec(self) -> "_Spec":
        return _SPECS[self.name]

    @property
    def p(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def param_list(self) -> list[float]:
        """Parameters in the spec's declared order, for custom-op schemas (float[])."""
        return [float(v) for _, v in self.params]

    @property
    def monotone(self) -> bool:
        return self.spec.monotone(self.p)

    @property
    def needs_mask(self) -> bool:
        """True when y does not say which branch x was on, so one bit per element is kept:
        non-monotone functions (which side of the minimum) and Softplus with a small
        threshold (f jumps there, so values just above it come from both sides)."""
        return self.branch_point is not None

    def saves_mask(self, dtype: torch.dtype) -> bool:
        """Whether Inverted keeps the 1-bit mask for inputs of this dtype: needs_mask, and
        Hardtanh with a bound that rounds inward in the dtype (bf16(-0.7) > -0.7): the
        clamped output then equals an input torch does not clamp, so y alone cannot tell
        a zero gradient from a passed-through one."""
        if self.needs_mask:
            return True
        return self.name == "hardtanh" and _bound_rounds_inward(self.p["min_val"], self.p["max_val"], dtype)

    def mask_bit(self, x: Tensor) -> Tensor:
        """The saved bit of each element, from x in its compare dtype (fp32 for half).
        Each is torch's own test, so gradients agree at the boundary and for NaN/inf."""
        p = self.p
        if self.name == "softplus":  # torch's linear side, for either sign of beta
            return x * p["beta"] > p["threshold"]
        if self.name == "hardtanh":  # torch's backward passes the gradient strictly inside
            return ~((x <= p["min_val"]) | (x >= p["max_val"]))
        if self.name == "hardswish":  # NaN goes right: y = NaN then says x = NaN, not -inf
            return ~(x <= self.branch_point)
        return x > self.branch_point

    @property
    def branch_point(self) -> float | None:
        """The mask bit is (mostly, see mask_bit) x > branch_point."""
        if not self.monotone:
            return self.x_min
        if self.spec.ambiguous_at is not None:
            return self.spec.ambiguous_at(self.p)
        return None

    @property
    def kinks(self) -> tuple[float, ...]:
        return tuple(self.spec.kinks(self.p))

    @property
    def x_min(self) -> float | None:
        """Location of the minimum of a non-monotone function (branch split point)."""
        return None if self.monotone else _x_min(self)

    @property
    def twin(self) -> tuple["Activation", float] | None:
        """(mathematically equal registry op, input scale) for formula activations."""
        spec = self.spec
        return None if spec.twin is None else (get(spec.twin), spec.twin_scale)

    def nan_derivative(self, x: Tensor) -> Tensor | None:
        """Where torch's derivative is NaN (x NaN, or also +-inf where f' is inf * 0);
        None for functions whose derivative is finite at every non-finite x."""
        kind = self.spec.nan_derivative
        if kind == "never":
            return None
        return torch.isnan(x) if kind == "nan" else ~torch.isfinite(x)

    @property
    def exact_from_output(self) -> bool:
        """True when f'(x) has a closed form in y (no numerical inverse)."""
        return self.spec.grad_from_output is not None

    # --- math -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Exactly what the torch module computes (never in place)."""
        return self.spec.forward(x, self.p)

    def derivative(self, x: Tensor) -> Tensor:
        """f'(x) with torch autograd's convention at kinks (reference, any dtype)."""
        # Identity hooks shadow any saved_tensors_hooks of the caller: this internal
        # computation (tables are fitted lazily, even mid-step) must not be measured.
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_same, _same):
            xr = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.forward(xr).sum(), xr)
        return g

    def __str__(self) -> str:
        if not self.params:
            return self.name
        args = ", ".join(f"{k}={v:g}" for k, v in self.params)
        return f"{self.name}({args})"


def _same(t: Tensor) -> Tensor:
    return t


@dataclass(frozen=True)
class _Spec:
    forward: Callable[[Tensor, dict], Tensor]
    param_names: tuple[str, ...] = ()
    monotone: Callable[[dict], bool] = lambda p: True
    kinks: Callable[[dict], list[float]] = lambda p: []
    # grad * f'(x) from grad, y = f(x) and, for non-monotone functions, right = (x > x_min).
    # Where torch itself differentiates from the output (sigmoid, tanh, ELU family, ReLU,
    # Hardtanh) its own backward kernel is reused, so gradients match torch bit for bit.
    # None means "needs the numerical inverse" (fewbit_fx.inverse).
    grad_from_output: Callable[[Tensor, Tensor, Tensor | None, dict], Tensor] | None = None
    modules: tuple[type, ...] = field(default_factory=tuple)
    # Formula activations (Hugging Face writes some GELUs out in torch ops) keep their exact
    # formula as forward but equal twin(scale * x) / scale mathematically, so the inverse
    # of the twin serves them: f'(x) = twin'(x') where twin(x') = scale * y.
    twin: str | None = None
    twin_scale: float = 1.0
    # Monotone functions with a jump where y alone cannot tell the side: x of the jump.
    ambiguous_at: Callable[[dict], float | None] | None = None
    # Where torch's derivative is NaN: "nan" (at x = NaN), "nonfinite" (also at +-inf)
    # or "never" (finite even at NaN, e.g. relu's threshold test). For ELU and Hardswish
    # torch's vectorised loop gives NaN at NaN and its scalar tail loop a finite value:
    # "nan", as for the bulk of any real tensor.
    nan_derivative: str = "nan"


def _scaled(derivative: Callable[[Tensor, Tensor | None, dict], Tensor]):
    """grad * f'(y) with f' evaluated in at least fp32, the result in grad's dtype."""

    def grad_from_output(grad: Tensor, y: Tensor, right: Tensor | None, p: dict) -> Tensor:
        compute = torch.promote_types(y.dtype, torch.float32)
        return (grad.to(compute) * derivative(y.to(compute), right, p)).to(grad.dtype)

    return grad_from_output


def _softplus_jump(p: dict) -> float | None:
    """torch switches to the identity for beta*x > threshold, where f jumps down by
    log1p(exp(-threshold))/beta; f' differs across by ~exp(-threshold). Only when that
    is visible in fp32 (>= 2^-24) does the side need a bit."""
    return p["threshold"] / p["beta"] if math.exp(-p["threshold"]) >= 2.0**-24 else None


@functools.lru_cache(maxsize=None)
def _bound_rounds_inward(lo: float, hi: float, dtype: torch.dtype) -> bool:
    """Whether torch's hardtanh in `dtype` clamps to a value strictly inside the bounds
    its backward compares against (fp32 ones). Only half types round them further."""
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    with real_tensors():
        ends = F.hardtanh(torch.tensor([-math.inf, math.inf], dtype=dtype), lo, hi).float()
        bounds = torch.tensor([lo, hi], dtype=torch.float32)
        return bool(ends[0] > bounds[0]) or bool(ends[1] < bounds[1])


def _softplus_from_output(y: Tensor, right: Tensor | None, p: dict) -> Tensor:
    """sigmoid(beta*x) = 1 - exp(-beta*y) below the threshold, 1 above it."""
    linear = right if right is not None else y * p["beta"] > p["threshold"]
    return torch.where(linear, torch.ones_like(y), -torch.expm1(-p["beta"] * y))


def _hardswish_from_output(y: Tensor, right: Tensor | None, p: dict) -> Tensor:
    root = torch.sqrt(torch.clamp(9.0 + 24.0 * y, min=0.0)) / 6.0
    inside = torch.where(right, root, -root)
    # Right branch: y >= 3 means x >= 3 (identity). Left branch: y == 0 means x <= -3.
    # y = NaN comes from x = NaN or -inf (-inf * 0); the bit tells them apart (see
    # Activation.mask_bit): NaN for x = NaN on the right, as torch's vectorised loop
    # gives, and 0 for x = -inf on the left.
    out = torch.where(right & (y >= 3.0), torch.ones_like(y), inside)
    return torch.where(~right & ~(y < 0), torch.zeros_like(y), out)


def _leaky_from_output(y: Tensor, right: Tensor | None, p: dict) -> Tensor:
    positive = (y > 0) if right is None else right
    slope = torch.full_like(y, p["negative_slope"])
    return torch.where(positive, torch.ones_like(y), slope)


def _elu_from_output(alpha: float, scale: float, input_scale: float):
    """torch's own ELU-family backward in its is_result form; input_scale 0 means 1/alpha."""

    def grad_from_output(grad: Tensor, y: Tensor, right: Tensor | None, p: dict) -> Tensor:
        a = p.get("alpha", alpha)
        s = input_scale if input_scale else 1.0 / a
        return torch.ops.aten.elu_backward(grad, a, scale, s, True, y)

    return grad_from_output


def _hardtanh_from_output(lo: str | float, hi: str | float):
    def grad_from_output(grad: Tensor, y: Tensor, right: Tensor | None, p: dict) -> Tensor:
        if right is not None:  # the saved bit is torch's own "strictly inside" test
            return grad.masked_fill(~right, 0)
        low, high = (p[v] if isinstance(v, str) else v for v in (lo, hi))
        return torch.ops.aten.hardtanh_backward(grad, y, low, high)

    return grad_from_output


_SPECS: dict[str, _Spec] = {
    "gelu": _Spec(
        forward=lambda x, p: F.gelu(x),
        monotone=lambda p: False,
        modules=(nn.GELU,),
        nan_derivative="nonfinite",
    ),
    "gelu_tanh": _Spec(
        forward=lambda x, p: F.gelu(x, approximate="tanh"),
        monotone=lambda p: False,
        nan_derivative="nonfinite",
    ),
    "silu": _Spec(
        forward=lambda x, p: F.silu(x), monotone=lambda p: False, modules=(nn.SiLU,),
        nan_derivative="nonfinite",
    ),
    "mish": _Spec(
        forward=lambda x, p: F.mish(x), monotone=lambda p: False, modules=(nn.Mish,),
        nan_derivative="nonfinite",
    ),
    "sigmoid": _Spec(
        forward=lambda x, p: torch.sigmoid(x),
        grad_from_output=lambda g, y, r, p: torch.ops.aten.sigmoid_backward(g, y),
        modules=(nn.Sigmoid,),
    ),
    "tanh": _Spec(
        forward=lambda x, p: torch.tanh(x),
        grad_from_output=lambda g, y, r, p: torch.ops.aten.tanh_backward(g, y),
        modules=(nn.Tanh,),
    ),
    "softplus": _Spec(
        forward=lambda x, p: F.softplus(x, p["beta"], p["threshold"]),
        param_names=("beta", "threshold"),
        kinks=lambda p: [p["threshold"] / p["beta"]],
        # sigmoid(beta*x) = 1 - exp(-beta*y); in the linear region beta*y > threshold it is 1.
        grad_from_output=_scaled(_softplus_from_output),
        ambiguous_at=_softplus_jump,
        modules=(nn.Softplus,),
    ),
    "elu": _Spec(
        forward=lambda x, p: F.elu(x, p["alpha"]),
        param_names=("alpha",),
        monotone=lambda p: p["alpha"] >= 0,
        kinks=lambda p: [0.0],
        grad_from_output=_elu_from_output(1.0, 1.0, 1.0),
        modules=(nn.ELU,),
    ),
    "selu": _Spec(
        forward=lambda x, p: F.selu(x),
        kinks=lambda p: [0.0],
        grad_from_output=_elu_from_output(_SELU_ALPHA, _SELU_SCALE, 1.0),
        modules=(nn.SELU,),
    ),
    "celu": _Spec(
        forward=lambda x, p: F.celu(x, p["alpha"]),
        param_names=("alpha",),
        monotone=lambda p: p["alpha"] > 0,
        kinks=lambda p: [0.0],
        grad_from_output=_elu_from_output(1.0, 1.0, 0.0),
        modules=(nn.CELU,),
    ),
    "leaky_relu": _Spec(
        forward=lambda x, p: F.leaky_relu(x, p["negative_slope"]),
        param_names=("negative_slope",),
        monotone=lambda p: p["negative_slope"] >= 0,
        kinks=lambda p: [0.0],
        grad_from_output=_scaled(_leaky_from_output),
        modules=(nn.LeakyReLU,),
        nan_derivative="never",
    ),
    "relu": _Spec(
        forward=lambda x, p: F.relu(x),
        kinks=lambda p: [0.0],
        grad_from_output=lambda g, y, r, p: torch.ops.aten.threshold_backward(g, y, 0),
        modules=(nn.ReLU,),
        nan_derivative="never",
    ),
    "relu6": _Spec(
        forward=lambda x, p: F.relu6(x),
        kinks=lambda p: [0.0, 6.0],
        grad_from_output=_hardtanh_from_output(0.0, 6.0),
        modules=(nn.ReLU6,),
        nan_derivative="never",
    ),
    "hardtanh": _Spec(
        forward=lambda x, p: F.hardtanh(x, p["min_val"], p["max_val"]),
        param_names=("min_val", "max_val"),
        kinks=lambda p: [p["min_val"], p["max_val"]],
        grad_from_output=_hardtanh_from_output("min_val", "max_val"),
        modules=(nn.Hardtanh,),
        nan_derivative="never",
    ),
    "hardsigmoid": _Spec(
        forward=lambda x, p: F.hardsigmoid(x),
        kinks=lambda p: [-3.0, 3.0],
        # Slope 1/6 strictly inside (-3, 3), where 0 < y < 1.
        grad_from_output=_scaled(
            lambda y, r, p: torch.where(
                (y > 0) & (y < 1), torch.full_like(y, 1.0 / 6.0), torch.zeros_like(y)
            )
        ),
        modules=(nn.Hardsigmoid,),
        nan_derivative="never",
    ),
    "hardswish": _Spec(
        forward=lambda x, p: F.hardswish(x),
        monotone=lambda p: False,
        kinks=lambda p: [-3.0, 3.0],
        grad_from_output=_scaled(_hardswish_from_output),
        modules=(nn.Hardswish,),
    ),
    "logsigmoid": _Spec(
        forward=lambda x, p: F.logsigmoid(x),
        grad_from_output=_scaled(lambda y, r, p: -torch.expm1(y)),
        modules=(nn.LogSigmoid,),
    ),
    "softsign": _Spec(
        forward=lambda x, p: F.softsign(x),
        grad_from_output=_scaled(lambda y, r, p: (1.0 - y.abs()) ** 2),
        modules=(nn.Softsign,),
        nan_derivative="nonfinite",
    ),
    "tanhshrink": _Spec(forward=lambda x, p: F.tanhshrink(x), modules=(nn.Tanhshrink,)),
    # Hugging Face formula activations, written exactly as transformers.activations does.
    "gelu_tanh_formula": _Spec(  # NewGELUActivation
        forward=lambda x, p: 0.5 * x * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3.0)))),
        monotone=lambda p: False,
        twin="gelu_tanh",
        nan_derivative="nonfinite",
    ),
    "gelu_fast_formula": _Spec(  # FastGELUActivation
        forward=lambda x, p: 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x))),
        monotone=lambda p: False,
        twin="gelu_tanh",
        nan_derivative="nonfinite",
    ),
    "gelu_erf_formula": _Spec(  # GELUActivation(use_gelu_python=True)
        forward=lambda x, p: x * 0.5 * (1.0 + torch.erf(x / _SQRT_2)),
        monotone=lambda p: False,
        twin="gelu",
        nan_derivative="nonfinite",
    ),
    "quick_gelu": _Spec(  # QuickGELUActivation: x * sigmoid(1.702 x) = silu(1.702 x) / 1.702
        forward=lambda x, p: x * torch.sigmoid(1.702 * x),
        monotone=lambda p: False,
        twin="silu",
        twin_scale=1.702,
        nan_derivative="nonfinite",
    ),
}

SUPPORTED: tuple[str, ...] = tuple(_SPECS)


def get(name: str, **params: float) -> Activation:
    """Look an activation up by registry name; parameters default like torch's modules."""
    if name not in _SPECS:
        raise TypeError(f"unsupported activation {name!r}; supported: {', '.join(SUPPORTED)}")
    defaults = _DEFAULTS.get(name, {})
    unknown = set(params) - set(_SPECS[name].param_names)
    if unknown:
        raise TypeError(f"{name} takes parameters {_SPECS[name].param_names}, got {sorted(unknown)}")
    values = {**defaults, **params}
    if name == "softplus" and not (math.isfinite(values["beta"]) and values["beta"] != 0):
        raise ValueError(f"Softplus beta must be a finite nonzero number, got {values['beta']!r}")
    return Activation(name, tuple((k, float(values[k])) for k in _SPECS[name].param_names))


_DEFAULTS: dict[str, dict[str, float]] = {
    "softplus": {"beta": 1.0, "threshold": 20.0},
    "elu": {"alpha": 1.0},
    "celu": {"alpha": 1.0},
    "leaky_relu": {"negative_slope": 0.01},
    "hardtanh": {"min_val": -1.0, "max_val": 1.0},
}


def from_op_args(name: str, params: list[float]) -> Activation:
    """Rebuild an Activation from a custom op's (str, float[]) arguments."""
    return Activation(name, tuple(zip(_SPECS[name].param_names, map(float, params))))


def from_module(module: nn.Module) -> Activation:
    """The Activation a torch.nn (or Hugging Face) activation module computes.

    Raises TypeError naming the supported modules when the module is not one of them.
    """
    hf = _from_hf_module(module)
    if hf is not None:
        return hf
    if isinstance(module, nn.GELU):
        return get("gelu_tanh" if module.approximate == "tanh" else "gelu")
    # Most specific class first: ReLU6 is a Hardtanh subclass.
    for name, spec in sorted(_SPECS.items(), key=lambda kv: -_mro_depth(kv[1].modules)):
        if spec.modules and isinstance(module, spec.modules):
            return get(name, **{k: getattr(module, k) for k in spec.param_names})
    raise TypeError(
        f"unsupported activation module {type(module).__name__}; supported: "
        + ", ".join(sorted({m.__name__ for s in _SPECS.values() for m in s.modules}))
        + " and the Hugging Face activations " + ", ".join(sorted(_HF_CLASSES))
    )


def _mro_depth(classes: tuple[type, ...]) -> int:
    return max((len(c.__mro__) for c in classes), default=0)


# Hugging Face activation classes (transformers.activations), recognised by class name so
# transformers stays an optional dependency. Formula-based ones map to the op they equal.
_HF_CLASSES: dict[str, str] = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh_formula",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_fast_formula",
    "SiLUActivation": "silu",
    "MishActivation": "mish",
    "QuickGELUActivation": "quick_gelu",
}


def _from_hf_module(module: nn.Module) -> Activation | None:
    if not type(module).__module__.startswith("transformers"):
        return None
    name = _HF_CLASSES.get(type(module).__name__)
    if name is None:
        return None
    if name == "gelu" and getattr(module, "act", F.gelu) is not F.gelu:
        name = "gelu_erf_formula"  # GELUActivation(use_gelu_python=True)
    if name == "mish" and getattr(module, "act", F.mish) is not F.mish:
        return None  # MishActivation's python fallback (old torch): not worth a formula entry
    return get(name)


@functools.lru_cache(maxsize=None)
def _x_min(act: Activation) -> float:
    """Minimum of a non-monotone activation, by bisection on the sign of a float64 central
    difference of the forward. Forward-only on purpose: it may first run inside a custom op,
    below autograd. Accurate to ~1e-9, far below what a branch bit can notice."""
    if act.name in ("leaky_relu", "elu", "celu"):
        return 0.0
    if act.name == "hardswish":
        return -1.5
    h = 1e-6

    def slope(v: float) -> float:
        pts = torch.tensor([v - h, v + h], dtype=torch.float64)
        y = act.forward(pts)
        return float(y[1] - y[0])

    lo, hi = -6.0, 0.0
    with real_tensors():
        return _bisect_min(act, slope, lo, hi)


def _bisect_min(act: Activation, slope, lo: float, hi: float) -> float:
    if not (slope(lo) < 0 < slope(hi)):
        raise ValueError(f"{act} has no single minimum in [-6, 0]")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(mid) < 0 else (lo, mid)
    return 0.5 * (lo + hi)


def real_tensors():
    """Compute cached constants on real tensors even when first asked for while torch.compile
    traces with fake tensors (active dispatch modes are suspended)."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


__all__ = ["Activation", "SUPPORTED", "get", "from_module"]
