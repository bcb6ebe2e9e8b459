"""Example inputs as users pass them, and the copies the analysis runs on."""
from __future__ import annotations

import copy


def normalise(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    """(args, kwargs) from optimize()/report()'s example_inputs (a tensor, tuple or list)
    and example_kwargs."""
    if example_inputs is None:
        args = ()
    elif isinstance(example_inputs, tuple):
        args = example_inputs
    elif isinstance(example_inputs, list):
        args = tuple(example_inputs)
    else:
        args = (example_inputs,)
    return args, dict(example_kwargs or {})


def analysis_copy(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Copies of the inputs for the analysis runs: a stateful input (a Hugging Face
    DynamicCache, a list that the forward appends to) must see only the user's own call.
    Inputs that cannot be deep-copied (non-leaf tensors) are used as they are."""
    try:
        return copy.deepcopy((args, kwargs))
    except Exception:  # noqa: BLE001 - deepcopy refuses some tensors and objects
        return args, kwargs
