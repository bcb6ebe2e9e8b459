"""Drop-in modules: wrap a torch activation module so backward keeps fewer bytes.

    FewBit(nn.GELU(), bits=3)   # backward keeps 3 bits per element (approximate gradient)
    FewBit(nn.GELU()).fit(x)    # the same, with the table fitted to inputs like x
    Inverted(nn.GELU())         # backward keeps the output y (+1 bit); exact to the floor
    Inverted(nn.LayerNorm(d))   # backward keeps y and per-row statistics, not x (also
                                # nn.RMSNorm and Hugging Face's RMSNorm; the same Parameters)

Both return exactly what the wrapped module returns. Like it, they write into their
input only with inplace=True (the default follows the wrapped module's own `inplace`):
then y lands in x's storage and x is returned, as `nn.SiLU(inplace=True)` does, and
backward keeps only what the out-of-place variant keeps (fewbit_fx.ops.inplace).
Under torch.func transforms (grad, jacrev, vmap, functional_call) they run the same
backward through fewbit_fx.ops.transforms.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fewbit_fx import ops
from fewbit_fx.activations import Activation, from_module
from fewbit_fx.ops import inplace as inplace_ops
from fewbit_fx.ops import transforms
from fewbit_fx.ops._common import check_input
from fewbit_fx.ops.norm import plain_norm
from fewbit_fx.packing import check_bits


FIT_SAMPLES = 1 << 18  # random input elements a table is fitted to
MIN_FIT_SAMPLES = 256  # fewer inputs than this say too little to fit a table to
REFIT_EVERY = 100      # optimize(tables="fitted"): first refit after this many training calls
REFIT_INTERVAL_CAP = 10
_SAMPLING = torch.Generator().manual_seed(0x5EED)  # private: the user's RNG stream is untouched


def _activation(act: nn.Module | Activation) -> Activation:
    return act if isinstance(act, Activation) else from_module(act)


def _needs_saving(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _inplace(act: nn.Module | Activation, inplace: bool | None) -> bool:
    """inplace=None: as the wrapped module (nn.SiLU(inplace=True) writes into x)."""
    if inplace is None:
        return isinstance(act, nn.Module) and getattr(act, "inplace", False) is True
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True, False or None (as the wrapped module), got {inplace!r}")
    return inplace


class FewBit(nn.Module):
    """Few-bit backward: stores the b-bit interval of x, backward uses the optimal level."""

    def __init__(
        self,
        act: nn.Module | Activation,
        bits: int = 3,
        density: Callable | None = None,
        refit_every: int | None = None,
        inplace: bool | None = None,
    ) -> None:
        super().__init__()
        from fewbit_fx.tables import optimal_table

        self.activation = _activation(act)
        self.inplace = _inplace(act, inplace)
        self.bits = check_bits(bits)
        self.fitted_on: int | None = None  # how many observed inputs the table was fitted to
        self.schedule_refits(refit_every)
        table = optimal_table(self.activation, self.bits, density)
        # Non-persistent: swapping an activation must not change the model's state_dict.
        self.register_buffer("borders", table.borders.float(), persistent=False)
        self.register_buffer("levels", table.levels.float(), persistent=False)

    def fit(self, samples: Tensor) -> "FewBit":
        """Refit the table to inputs this activation actually sees (any shape; at most
        FIT_SAMPLES random elements are used). The default table assumes N(0, 1) inputs;
        trained networks drift far from that, and a table fitted to the wrong range biases
        every gradient."""
        from fewbit_fx.tables import SampleDensity, optimal_table, random_subset

        density = SampleDensity(random_subset(samples, FIT_SAMPLES, _SAMPLING))
        return self.set_table(optimal_table(self.activation, self.bits, density), density.samples)

    def set_table(self, table, fitted_on: int | None = None) -> "FewBit":
        """Use `table` (a fewbit_fx.tables.Table with 2^bits levels) from now on. New
        tensors, not in-place copies: a step in flight keeps the table it saved."""
        if table.levels.numel() != 2**self.bits:
            raise ValueError(f"table has {table.levels.numel()} levels; bits={self.bits} needs {2**self.bits}")
        self.borders = table.borders.to(self.borders.device, torch.float32)
        self.levels = table.levels.to(self.levels.device, torch.float32)
        self.fitted_on = fitted_on
        return self

    def schedule_refits(self, every: int | None) -> "FewBit":
        """Refit to the input of the training call `every` calls from now, then at doubling
        intervals up to REFIT_INTERVAL_CAP x `every` (None: never). The inputs' distribution
        moves while a network trains, fastest early on, and a table fitted once goes stale
        (reports/convergence_fitted_once/ measures what that costs). Eager only: under
        torch.compile the module keeps the table it has."""
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"refit_every must be a positive integer or None, got {every!r}")
        self.refit_every = every
        self._calls = 0  # training calls counted toward the next refit
        self._interval = every
        self._next_refit = every
        return self

    def _maybe_refit(self, x: Tensor) -> None:
        if self.refit_every is None or torch.compiler.is_compiling() or transforms.active():
            return
        self._calls += 1
        if self._calls >= self._next_refit and x.numel() >= MIN_FIT_SAMPLES:
            self.fit(x)
            self._interval = min(2 * self._interval, REFIT_INTERVAL_CAP * self.refit_every)
            self._next_refit = self._calls + self._interval

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "FewBit")  # also without grad: the same inputs work in both modes
        if not _needs_saving(x):
            return self.activation.forward_(x) if self.inplace else self.activation.forward(x)
        self._maybe_refit(x)
        if self.inplace:
            return inplace_ops.fewbit_forward_(x, self.activation.name, self.activation.param_list,
                                               self.borders, self.levels, self.bits)
        op = transforms.fewbit_forward if transforms.active() else ops.fewbit_forward
        y, _ = op(x, self.activation.name, self.activation.param_list, self.borders, self.levels, self.bits)
        return y

    def extra_repr(self) -> str:
        fitted = f", fitted_on={self.fitted_on}" if self.fitted_on else ""
        refit = f", refit_every={self.refit_every}" if self.refit_every else ""
        inplace = ", inplace=True" if self.inplace else ""
        return f"{self.activation}, bits={self.bits}{fitted}{refit}{inplace}"


class Inverted(nn.Module):
    """Inverted activation: backward keeps the output (shared with the next layer).
    Given a norm module (see InvertedNorm), builds an InvertedNorm."""

    def __new__(cls, act=None, *args, **kwargs):
        if cls is Inverted and norm_kind(act) is not None:
            cls = InvertedNorm
        return super().__new__(cls)

    def __init__(self, act: nn.Module | Activation, inplace: bool | None = None) -> None:
        super().__init__()
        self.activation = _activation(act)
        self.inplace = _inplace(act, inplace)
        if not self.activation.invertible:
            raise ValueError(
                f"Inverted does not support {self.activation} with alpha <= 0 (torch's "
                "result-based ELU backward rejects it); use FewBit or keep the module"
            )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "Inverted")  # also without grad: the same inputs work in both modes
        if not _needs_saving(x):
            return self.activation.forward_(x) if self.inplace else self.activation.forward(x)
        if self.inplace:
            return inplace_ops.inverted_forward_(x, self.activation.name, self.activation.param_list)
        op = transforms.inverted_forward if transforms.active() else ops.inverted_forward
        y, _ = op(x, self.activation.name, self.activation.param_list)
        return y

    def extra_repr(self) -> str:
        return f"{self.activation}, inplace=True" if self.inplace else str(self.activation)


def norm_kind(module) -> str | None:
    """The fewbit_fx.ops.norm formula a norm module computes, or None for other modules:
    nn.LayerNorm, nn.RMSNorm, and Hugging Face's RMSNorm (a class named *RMSNorm with
    `variance_epsilon` and a `weight`, computing weight * (x_f32 * rsqrt(...)).to(dtype):
    Llama, Mistral, Qwen2; not Gemma's (1 + weight))."""
    if isinstance(module, nn.LayerNorm):
        return "layer_norm"
    if isinstance(module, nn.RMSNorm):
        return "rms_norm"
    if (isinstance(module, nn.Module) and type(module).__name__.endswith("RMSNorm")
            and hasattr(module, "variance_epsilon") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and "Gemma" not in type(module).__name__):
        return "hf_rms_norm"
    return None


class InvertedNorm(Inverted):
    """A LayerNorm / RMSNorm whose backward keeps its output y (which the next layer keeps
    anyway) and per-row statistics instead of its input (fewbit_fx.ops.norm; channels y
    cannot tell, such as gamma = 0, keep x's columns). Built by Inverted(norm).

    It holds the norm's own Parameter objects under the norm's names, and nothing else, so
    optimizers, state_dict keys and loading are unchanged by the swap."""

    def __init__(self, norm: nn.Module) -> None:
        nn.Module.__init__(self)
        self.kind = norm_kind(norm)
        if self.kind is None:
            raise TypeError(f"fewbit-fx: Inverted norms take nn.LayerNorm, nn.RMSNorm or a Hugging "
                            f"Face RMSNorm, got {type(norm).__name__}")
        if self.kind == "hf_rms_norm":
            shape, eps = tuple(norm.weight.shape), float(norm.variance_epsilon)
        else:
            shape, eps = tuple(norm.normalized_shape), norm.eps
        self.normalized_shape, self.eps = shape, eps
        names = ("weight", "bias") if self.kind == "layer_norm" else ("weight",)
        for name in names:
            p = getattr(norm, name, None)
            if p is not None and not isinstance(p, nn.Parameter):
                raise TypeError(f"fewbit-fx: the norm's {name} is a {type(p).__name__}, not a Parameter")
            self.register_parameter(name, p)
        if self.kind != "layer_norm":
            self.bias = None  # a plain attribute: no state_dict entry

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "Inverted")
        if not (torch.is_grad_enabled() and (x.requires_grad or any(
                p is not None and p.requires_grad for p in (self.weight, self.bias)))):
            return plain_norm(x, self.kind, list(self.normalized_shape), self.weight, self.bias,
                              self.eps)
        if transforms.active():
            raise RuntimeError(
                "fewbit-fx: Inverted norms do not support torch.func transforms (grad, vmap, "
                "functional_call under a transform): their saved side tensor has a data-dependent "
                "size; keep the original norm module there")
        y, *_ = ops.inverted_norm_forward(x, self.kind, list(self.normalized_shape), self.weight,
                                          self.bias, self.eps, not torch.compiler.is_compiling())
        return y

    def extra_repr(self) -> str:
        return f"{self.kind}, {tuple(self.normalized_shape)}, eps={self.eps}"


__all__ = ["FewBit", "Inverted"]
