"""The form of one registry entry: everything fewbit-fx knows about one activation.

detect, saves, inverse and the kernels read their tables from these entries
(`fewbit_fx.activations.registry.SPECS`), so adding an activation is writing one `Spec`;
tests/test_activations.py fails for an entry that is only half declared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

Params = dict[str, float]


@dataclass(frozen=True)
class ClosedForm:
    """f'(x) has a closed form in y = f(x).

    grad_from_output(grad, y, right, p) returns grad * f'(x); `right` is the saved branch
    bit (`Spec.mask_bit`) where one is saved, else None. Where torch itself differentiates
    from the output (sigmoid, tanh, ELU family, ReLU, Hardtanh) it calls torch's own
    backward kernel, so gradients match torch bit for bit.
    """

    grad_from_output: Callable[[Tensor, Tensor, Tensor | None, Params], Tensor]


@dataclass(frozen=True)
class Numerical:
    """No closed form: fewbit_fx.inverse tabulates x(y) per branch from these explicit
    float64 f and f' (written to stay accurate in both tails, which the torch op is not)."""

    f: Callable[[Tensor], Tensor]
    slope: Callable[[Tensor], Tensor]
    x_end: float  # past it f(x) = x (+ const) and f'(x) = 1 to float64 precision


@dataclass(frozen=True)
class Twin:
    """A formula equal to twin(scale * x) / scale, so the twin's inverse serves it:
    f'(x) = twin'(x') where twin(x') = scale * y. A str scale names the parameter that
    holds it (swish's beta)."""

    name: str
    scale: float | str = 1.0


@dataclass(frozen=True)
class Kernel:
    """Its branch in the Triton kernels (fewbit_fx.kernels.triton_common): the value of
    the ACT switch, and the scalars P0, P1, P2 that branch reads (rounded to fp32 there)."""

    id: int
    scalars: Callable[[Params], tuple[float, float, float]] = lambda p: (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Spec:
    """One activation. Only `forward` and `inverse` are required; the defaults describe a
    monotone function with no parameters, no kinks and no way to be called (so at least
    one of functions, methods, modules, hf_classes, or another entry's variants, is needed
    for detect to find it)."""

    # --- the math -------------------------------------------------------------------------
    forward: Callable[[Tensor, Params], Tensor]  # the torch op itself (bit-identical), never in place
    inverse: ClosedForm | Numerical | Twin       # how backward gets f'(x) from y
    params: tuple[tuple[str, float], ...] = ()   # (name, torch's default), in the op's argument order
    check: Callable[[Params], None] | None = None  # raises for parameter values fewbit-fx refuses
    monotone: Callable[[Params], bool] = lambda p: True
    x_min: float | None = None  # where the minimum is when not monotone; None: found by bisection
    kinks: Callable[[Params], list[float]] = lambda p: []  # where f' jumps (few-bit borders go there)
    # Monotone functions with a jump where y alone cannot tell the side: x of the jump.
    ambiguous_at: Callable[[Params], float | None] | None = None
    # The saved bit from x (in its compare dtype) and the branch point: torch's own test.
    mask_bit: Callable[[Tensor, Params, float | None], Tensor] = lambda x, p, branch: x > branch
    # Also keep the bit in this dtype although y alone tells the branch in exact arithmetic.
    mask_for_dtype: Callable[[Params, torch.dtype], bool] = lambda p, dtype: False
    # Where torch's derivative is NaN: "nan" (at x = NaN), "nonfinite" (also at +-inf,
    # where f' is inf * 0) or "never" (finite even at NaN, e.g. relu's threshold test).
    nan_derivative: str = "nan"

    # --- how models call it (passes/detect) -----------------------------------------------
    # target -> names of its positional arguments after the input (an "inplace" one is a flag)
    functions: dict[Callable, tuple[str, ...]] = field(default_factory=dict)
    inplace_functions: dict[Callable, tuple[str, ...]] = field(default_factory=dict)  # torch.relu_
    methods: tuple[str, ...] = ()          # x.tanh()
    inplace_methods: tuple[str, ...] = ()  # x.tanh_()
    # An argument (and module attribute) whose value selects another entry:
    # {"approximate": {"tanh": "gelu_tanh"}} on gelu.
    variants: dict[str, dict[str, str]] = field(default_factory=dict)
    modules: tuple[type[nn.Module], ...] = ()
    # Hugging Face classes (transformers.activations), by name so transformers stays optional;
    # hf_accepts tells this entry's instances from another's of the same class.
    hf_classes: tuple[str, ...] = ()
    hf_accepts: Callable[[nn.Module], bool] = lambda module: True
    # The forward is several torch ops (Hugging Face writes some GELUs out): detect takes
    # all the nodes traced inside the module as one site, and finds the same op sequence
    # in any code by graph pattern (passes/formulas: the pattern is this forward, traced).
    formula: bool = False

    # --- what torch's own backward keeps (passes/saves) -----------------------------------
    saves_result: bool = False          # y, not x (sigmoid, tanh, relu)
    saves_result_inplace: bool = False  # y when called in place (elu_, celu, selu)

    # --- the Triton kernels (None: CUDA uses the ops' torch implementations) -------------
    kernel: Kernel | None = None

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.params)

    @property
    def defaults(self) -> Params:
        return dict(self.params)
