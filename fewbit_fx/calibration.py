"""Calibration: fit each few-bit table to the inputs its activation really sees.

The default tables are optimal for N(0, 1) pre-activations. Trained networks drift far from
that (in our byte-level GPT after training: mean -1.8, std 2.1), and a table fitted to the
wrong range biases every gradient that passes through it: adapter fine-tunes diverged. One
forward of the rewritten model on the example inputs records a random subsample of every
new FewBit module's input; each table is then refitted to those samples (same DP, under
their smoothed density). The error of f' on the samples is measured for the fitted and the
N(0, 1) table, so the report shows what fitting changed. The modules then keep refitting to
their own inputs during eager training (FewBit.schedule_refits): a table fitted once, at
initialisation, goes stale as the network trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fewbit_fx._state import preserved_state
from fewbit_fx.nn import FIT_SAMPLES, MIN_FIT_SAMPLES, REFIT_EVERY, FewBit
from fewbit_fx.tables import SampleDensity, optimal_table, random_subset, sample_rel_rmse

TABLES = ("fitted", "normal")
MIN_SAMPLES = MIN_FIT_SAMPLES  # fewer observed inputs: keep the N(0, 1) table
PER_CALL = 1 << 16        # samples taken from one call of a module
MAX_SAMPLES = FIT_SAMPLES  # samples kept per module over all its calls
_SEED = 0x5EED            # a private generator: the user's random stream is untouched


@dataclass(frozen=True)
class Calibration:
    samples: int                  # observed inputs the numbers below are measured on
    fitted: bool                  # False: too few samples, the N(0, 1) table stays
    error_normal: float           # relative RMS error of f' on the samples, N(0, 1) table
    error_fitted: float | None    # the same for the fitted table

    def describe(self) -> str:
        if not self.fitted and self.samples == 0:
            return "N(0,1) table until training refits it: no input reached it on the example inputs"
        if not self.fitted:
            return (f"N(0,1) table until training refits it: only {self.samples} inputs "
                    f"observed (< {MIN_SAMPLES}); f' error on them {self.error_normal:.3f}")
        return (f"table fitted to {self.samples} observed inputs: f' error {self.error_fitted:.3f} "
                f"(N(0,1) table: {self.error_normal:.3f})")


def check_tables(tables: str) -> str:
    if tables not in TABLES:
        raise ValueError(f"tables must be one of {TABLES}, got {tables!r}: 'fitted' fits each "
                         "few-bit table to the example inputs, 'normal' assumes N(0, 1) inputs")
    return tables


def calibrate(model: nn.Module, modules: dict[object, FewBit], args: tuple,
              kwargs: dict) -> dict[object, Calibration]:
    """Record the inputs of `modules` during one forward of `model`, refit their tables,
    and have them refit during training (FewBit.schedule_refits). Keys are the caller's
    (one per module); the model's state and the RNG are restored."""
    samples = record_inputs(model, list(modules.values()), args, kwargs)
    out = {}
    for key, module in modules.items():
        module.schedule_refits(REFIT_EVERY)
        s = samples.get(id(module))
        n = 0 if s is None else s.numel()
        normal = optimal_table(module.activation, module.bits)
        error_normal = sample_rel_rmse(module.activation, normal, s) if n else float("nan")
        if n < MIN_SAMPLES:
            out[key] = Calibration(n, False, error_normal, None)
            continue
        fitted = optimal_table(module.activation, module.bits, SampleDensity(s))
        module.set_table(fitted, n)
        out[key] = Calibration(n, True, error_normal, sample_rel_rmse(module.activation, fitted, s))
    return out


def record_inputs(model: nn.Module, modules: list[nn.Module], args: tuple,
                  kwargs: dict) -> dict[int, Tensor]:
    """{id(module): float32 CPU samples of its inputs} from one no-grad forward."""
    generator = torch.Generator().manual_seed(_SEED)
    taken: dict[int, list[Tensor]] = {}

    def take(module, inputs):
        x = random_subset(inputs[0], PER_CALL, generator)
        taken.setdefault(id(module), []).append(x.to("cpu", torch.float32))

    handles = [m.register_forward_pre_hook(take) for m in modules]
    try:
        with preserved_state(model), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {key: random_subset(torch.cat(parts), MAX_SAMPLES, generator) for key, parts in taken.items()}
