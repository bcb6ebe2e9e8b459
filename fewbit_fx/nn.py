"""Drop-in modules: wrap a torch activation module so backward keeps fewer bytes.

    FewBit(nn.GELU(), bits=3)   # backward keeps 3 bits per element (approximate gradient)
    Inverted(nn.GELU())         # backward keeps the output y (+1 bit); exact to the floor

Both return exactly what the wrapped module returns and never write into their input.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from fewbit_fx import ops
from fewbit_fx.activations import Activation, from_module
from fewbit_fx.ops._common import check_input
from fewbit_fx.packing import check_bits


def _activation(act: nn.Module | Activation) -> Activation:
    return act if isinstance(act, Activation) else from_module(act)


def _needs_saving(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


class FewBit(nn.Module):
    """Few-bit backward: stores the b-bit interval of x, backward uses the optimal level."""

    def __init__(
        self,
        act: nn.Module | Activation,
        bits: int = 3,
        density: Callable | None = None,
    ) -> None:
        super().__init__()
        from fewbit_fx.tables import optimal_table

        self.activation = _activation(act)
        self.bits = check_bits(bits)
        table = optimal_table(self.activation, bits, density)
        # Non-persistent: swapping an activation must not change the model's state_dict.
        self.register_buffer("borders", table.borders.float(), persistent=False)
        self.register_buffer("levels", table.levels.float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "FewBit")  # also without grad: the same inputs work in both modes
        if not _needs_saving(x):
            return self.activation.forward(x)
        y, _ = ops.fewbit_forward(
            x, self.activation.name, self.activation.param_list, self.borders, self.levels, self.bits
        )
        return y

    def extra_repr(self) -> str:
        return f"{self.activation}, bits={self.bits}"


class Inverted(nn.Module):
    """Inverted activation: backward keeps the output (shared with the next layer)."""

    def __init__(self, act: nn.Module | Activation) -> None:
        super().__init__()
        self.activation = _activation(act)
        if self.activation.name in ("elu", "celu") and not self.activation.monotone:
            raise ValueError(
                f"Inverted does not support {self.activation} with alpha <= 0 (torch's "
                "result-based ELU backward rejects it); use FewBit or keep the module"
            )

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "Inverted")  # also without grad: the same inputs work in both modes
        if not _needs_saving(x):
            return self.activation.forward(x)
        y, _ = ops.inverted_forward(x, self.activation.name, self.activation.param_list)
        return y

    def extra_repr(self) -> str:
        return str(self.activation)


__all__ = ["FewBit", "Inverted"]
