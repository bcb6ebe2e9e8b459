"""Drop-in modules: wrap a torch activation module so backward keeps fewer bytes.

    FewBit(nn.GELU(), bits=3)   # backward keeps 3 bits per element (approximate gradient)
    FewBit(nn.GELU()).fit(x)    # the same, with the table fitted to inputs like x
    Inverted(nn.GELU())         # backward keeps the output y (+1 bit); exact to the floor

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
    """Inverted activation: backward keeps the output (shared with the next layer)."""

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


__all__ = ["FewBit", "Inverted"]
