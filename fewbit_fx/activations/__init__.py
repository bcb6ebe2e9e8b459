"""The pointwise nonlinearities fewbit-fx can rewrite.

Each is one entry of the registry (registry.SPECS, in the form of spec.Spec) that carries
everything about it: the exact forward (the torch op itself, so rewritten models compute
bit-identical outputs), parameters and defaults, monotonicity and the minimum, kinks, the
calls and modules detect matches, what torch's backward keeps, the inverse, the kernel id.
An `Activation` is one entry with fixed parameters; its properties read the entry.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewbit_fx.activations.registry import SPECS
from fewbit_fx.activations.spec import ClosedForm, Kernel, Numerical, Spec, Twin

SUPPORTED: tuple[str, ...] = tuple(SPECS)


@dataclass(frozen=True)
class Activation:
    """A nonlinearity with fixed parameters. Hashable: it keys the table cache."""

    name: str
    params: tuple[tuple[str, float], ...] = ()

    # --- registry lookups -------------------------------------------------------------
    @property
    def spec(self) -> Spec:
        return SPECS[self.name]

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
    def invertible(self) -> bool:
        """Whether Inverted supports it: not ELU/CELU with alpha <= 0 (torch's result-based
        ELU backward, which the inverse reuses, rejects those)."""
        return not (self.name in ("elu", "celu") and not self.monotone)

    @property
    def needs_mask(self) -> bool:
        """True when y does not say which branch x was on, so one bit per element is kept:
        non-monotone functions (which side of the minimum) and Softplus with a small
        threshold (f jumps there, so values just above it come from both sides)."""
        return self.branch_point is not None

    def saves_mask(self, dtype: torch.dtype) -> bool:
        """Whether Inverted keeps the 1-bit mask for inputs of this dtype: needs_mask, or
        the entry's mask_for_dtype (Hardtanh with a bound that rounds inward in half)."""
        return self.needs_mask or self.spec.mask_for_dtype(self.p, dtype)

    def mask_bit(self, x: Tensor) -> Tensor:
        """The saved bit of each element, from x in its compare dtype (fp32 for half).
        Each is torch's own test, so gradients agree at the boundary and for NaN/inf."""
        return self.spec.mask_bit(x, self.p, self.branch_point)

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
        inverse = self.spec.inverse
        if not isinstance(inverse, Twin):
            return None
        scale = self.p[inverse.scale] if isinstance(inverse.scale, str) else inverse.scale
        return get(inverse.name), scale

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
        return isinstance(self.spec.inverse, ClosedForm)

    # --- math -------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Exactly what the torch module computes (never in place; see forward_)."""
        return self.spec.forward(x, self.p)

    def forward_(self, x: Tensor) -> Tensor:
        """f(x) written into x's own storage, returning x: torch's own in-place op where
        there is one (so the values are those the user's in-place call computes), else
        f(x) copied in."""
        spec = self.spec
        for fn, args in spec.functions.items():
            if "inplace" in args and set(self.p) <= set(args):
                return fn(x, **self.p, inplace=True)
        if not self.params:
            for fn in spec.inplace_functions:
                return fn(x)
            for method in spec.inplace_methods:
                return getattr(x, method)()
        return x.copy_(self.forward(x))

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


def get(name: str, **params: float) -> Activation:
    """Look an activation up by registry name; parameters default like torch's modules."""
    if name not in SPECS:
        raise TypeError(f"unsupported activation {name!r}; supported: {', '.join(SUPPORTED)}")
    spec = SPECS[name]
    unknown = set(params) - set(spec.param_names)
    if unknown:
        raise TypeError(f"{name} takes parameters {spec.param_names}, got {sorted(unknown)}")
    values = {**spec.defaults, **params}
    if spec.check is not None:
        spec.check(values)
    return Activation(name, tuple((k, float(values[k])) for k in spec.param_names))


def from_op_args(name: str, params: list[float]) -> Activation:
    """Rebuild an Activation from a custom op's (str, float[]) arguments."""
    return Activation(name, tuple(zip(SPECS[name].param_names, map(float, params))))


# Derived from the registry: the module classes, most specific first (ReLU6 is a Hardtanh
# subclass), and the Hugging Face class names with the entries that claim each.
MODULE_CLASSES: tuple[type, ...] = tuple(c for s in SPECS.values() for c in s.modules)
HF_CLASSES: dict[str, tuple[str, ...]] = {
    cls: tuple(name for name, s in SPECS.items() if cls in s.hf_classes)
    for spec in SPECS.values() for cls in spec.hf_classes
}
_BY_MODULE = sorted(SPECS.items(), key=lambda kv: -max((len(c.__mro__) for c in kv[1].modules), default=0))


def from_module(module: nn.Module) -> Activation:
    """The Activation a torch.nn (or Hugging Face) activation module computes.

    Raises TypeError naming the supported modules when the module is not one of them.
    """
    hf = _from_hf_module(module)
    if hf is not None:
        return hf
    for name, spec in _BY_MODULE:
        if spec.modules and isinstance(module, spec.modules):
            name = _variant(spec, name, lambda arg: getattr(module, arg, None))
            return get(name, **{k: getattr(module, k) for k in SPECS[name].param_names})
    raise TypeError(
        f"unsupported activation module {type(module).__name__}; supported: "
        + ", ".join(sorted({m.__name__ for m in MODULE_CLASSES}))
        + " and the Hugging Face activations " + ", ".join(sorted(HF_CLASSES))
    )


def _variant(spec: Spec, name: str, value_of) -> str:
    """The entry that an argument listed in spec.variants selects (gelu's approximate)."""
    for arg, choices in spec.variants.items():
        value = value_of(arg)
        if isinstance(value, str) and value in choices:
            return choices[value]
    return name


def _from_hf_module(module: nn.Module) -> Activation | None:
    """By class name, so transformers stays an optional dependency."""
    if not type(module).__module__.startswith("transformers"):
        return None
    for name in HF_CLASSES.get(type(module).__name__, ()):
        if SPECS[name].hf_accepts(module):
            return get(name)
    return None


@functools.lru_cache(maxsize=None)
def _x_min(act: Activation) -> float:
    """Minimum of a non-monotone activation, by bisection on the sign of a float64 central
    difference of the forward. Forward-only on purpose: it may first run inside a custom op,
    below autograd. Accurate to ~1e-9, far below what a branch bit can notice."""
    if act.spec.x_min is not None:
        return act.spec.x_min
    if isinstance(act.spec.inverse, Twin) and isinstance(act.spec.inverse.scale, str):
        twin, scale = act.twin  # a parametrised scale moves the minimum (maybe out of [-6, 0])
        return _x_min(twin) / scale
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


__all__ = ["Activation", "ClosedForm", "HF_CLASSES", "Kernel", "MODULE_CLASSES", "Numerical", "SPECS", "SUPPORTED",
           "Spec", "Twin", "from_module", "get"]
