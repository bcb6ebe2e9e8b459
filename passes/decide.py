"""Decide: per site, inverted, few-bit or kept, from what its neighbours already keep.

- some consumer keeps y        -> inverted: exact, 0 or 1 extra bit per element;
- nobody keeps y               -> few-bit: b bits per element instead of a full tensor;
- x is kept by another op       -> kept: rewriting saves nothing.
Every decision carries the byte estimate and a reason a person can read.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from fewbit_fx._compat import size_hint
from fewbit_fx.packing import packed_nbytes
from fewbit_fx.passes.detect import Site
from fewbit_fx.passes.norms import Norm
from fewbit_fx.passes.saves import SiteSaves

MODES = ("auto", "exact", "fewbit")


@dataclass(frozen=True)
class Decision:
    variant: str          # "inverted", "fewbit", or "kept"
    bits: int | None
    saved_after: int
    reason: str

    @property
    def label(self) -> str:
        return f"fewbit-{self.bits}" if self.variant == "fewbit" else self.variant


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


OVERRIDE_CHOICES = "'auto', 'exact', 'fewbit', 'fewbit-<b>' with b in 1..8, or 'keep'"


def parse_override(value: str, bits: int, pattern: str = "*") -> tuple[str, int]:
    """'auto' | 'exact' | 'fewbit' | 'fewbit-<b>' | 'keep' -> (mode or 'keep', bits).
    Anything else raises, naming overrides[pattern] and the valid choices."""
    if not isinstance(value, str):
        raise TypeError(f"overrides[{pattern!r}] = {value!r} is not a valid choice; use {OVERRIDE_CHOICES}")
    if value == "keep":
        return "keep", bits
    b = value[len("fewbit-"):]
    if value.startswith("fewbit-") and b.isdecimal() and 1 <= int(b) <= 8:
        return "fewbit", int(b)
    if value in MODES:
        return value, bits
    raise ValueError(f"overrides[{pattern!r}] = {value!r} is not a valid choice; use {OVERRIDE_CHOICES}")


def check_overrides(overrides) -> dict[str, str]:
    """The overrides argument, checked whole (a bad entry raises even if no site matches
    it): None or a dict of module-path patterns (fnmatch) to OVERRIDE_CHOICES."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict of module-path patterns to {OVERRIDE_CHOICES}, "
                        f"e.g. {{'encoder.*': 'fewbit-4'}}; got {type(overrides).__name__} {overrides!r}")
    for pattern, value in overrides.items():
        if not isinstance(pattern, str):
            raise TypeError(f"overrides keys must be module-path patterns (str), got {pattern!r}")
        parse_override(value, 3, pattern)
    return dict(overrides)


def site_mode(site: Site, mode: str, bits: int, overrides: dict[str, str] | None) -> tuple[str, int]:
    """The mode and bits for one site: the first matching override pattern wins."""
    for pattern, value in check_overrides(overrides).items():
        if fnmatch.fnmatchcase(site.name, pattern):
            return parse_override(value, bits, pattern)
    return mode, bits


def decide(site: Site, saves: SiteSaves, mode: str, bits: int, forced: bool = False) -> Decision:
    """`forced`: return the mode's variant wherever it is safe, even if it saves nothing
    here (a module shared with sites where it does save)."""
    if mode == "keep":
        return Decision("kept", None, saves.saved_before, "kept by an override")
    if isinstance(site.activation, Norm):
        return _decide_norm(site, saves, forced)
    if saves.saved_before == 0 and not forced:
        why = (f"its input is kept anyway by {saves.x_kept_by[0]}" if saves.x_kept_by
               else "it keeps nothing that others do not keep already")
        return Decision("kept", None, 0, f"no saving possible: {why}")
    candidates = []
    if mode in ("auto", "exact"):
        if saves.y_mutated or not site.activation.invertible:
            inverted = None
        else:
            mask = packed_nbytes(saves.numel, 1) if site.activation.saves_mask(saves.dtype) else 0
            extra = 0 if saves.y_kept_by else saves.y_bytes
            inverted = Decision("inverted", None, extra + mask, _inverted_reason(site, saves))
        if inverted is not None:
            candidates.append(inverted)
    if mode in ("auto", "fewbit"):
        # codes and the non-finite flag byte; the levels are the module's buffer, kept once
        # for all calls (like parameters, not counted)
        after = packed_nbytes(saves.numel, bits) + 1
        candidates.append(Decision("fewbit", bits, after, _fewbit_reason(saves, bits)))
    if not candidates:
        why = (f"{_mutated(saves)}, so it cannot be saved" if site.activation.invertible
               else f"Inverted does not support {site.activation} (alpha <= 0)")
        return Decision("kept", None, saves.saved_before, f"{why} (exact mode)")
    best = min(candidates, key=lambda d: (d.saved_after, d.variant != "inverted"))
    if best.saved_after >= saves.saved_before and not forced:
        return Decision("kept", None, saves.saved_before,
                        f"{best.label} would keep {best.saved_after} B, no less than now")
    if site.checkpointed:
        return _in_checkpointed_region(best)
    return best


def _decide_norm(site: Site, saves: SiteSaves, forced: bool) -> Decision:
    """Inverted (exact) in every mode where a consumer keeps y: there is no few-bit norm.
    What it keeps beyond the original's: for the RMSNorms, whose own statistics the
    analysis counted, its rstd per row (_statistics_bytes); the columns of x it keeps where the weight
    makes y unusable (gamma = 0, |beta| beyond what y spans) depend on the values, per call,
    so the estimate cannot include them (tests/ops/test_norm_op.py)."""
    if saves.y_mutated:
        return Decision("kept", None, saves.saved_before, f"{_mutated(saves)}, so the norm keeps its input")
    if not saves.y_kept_by:
        return Decision("kept", None, saves.saved_before,
                        "no consumer keeps its output: keeping y instead of x saves nothing")
    rows = size_hint(saves.numel) // max(size_hint(saves.shape[-1]), 1) if saves.shape else 1
    extra = rows * _statistics_bytes(site.activation, saves.dtype)
    if extra >= saves.saved_before and not forced:
        why = (f"its input is kept anyway by {saves.x_kept_by[0]}" if saves.x_kept_by
               else "it keeps nothing that others do not keep already")
        return Decision("kept", None, saves.saved_before, f"no saving possible: {why}")
    return Decision("inverted", None, extra,
                    f"output already kept by {saves.y_kept_by[0]}; per-row statistics, and x's "
                    "columns where the weight makes y unusable (gamma = 0), decided per call")


def _statistics_bytes(norm: Norm, dtype) -> int:
    """Bytes per row of the statistics the inverted op keeps (the original's own were
    counted in saved_before: the aten-op RMSNorms' rsqrt node, F.layer_norm's and
    F.rms_norm's internal tensors): rstd, and layer_norm's mean, in fp32 (fp64 for fp64 x;
    hf's and T5's fp32 always, the uncast one's in x's dtype)."""
    import torch

    if norm.name in ("hf_rms_norm", "t5_rms_norm"):
        return 4
    if norm.name == "uncast_rms_norm":  # its rstd is in x's dtype, as the original's
        return dtype.itemsize
    per = torch.promote_types(dtype, torch.float32).itemsize
    return 2 * per if norm.name == "layer_norm" else per


CHECKPOINTED = ("inside an activation-checkpointed region: saved only while the region is "
                "recomputed in backward")


def _in_checkpointed_region(best: Decision) -> Decision:
    """The same decision as outside a region, saying where it acts. A checkpointed region's
    tensors live only while backward recomputes it, so a rewrite changes the step's peak,
    not the bytes saved across it. Inverted: until the ops that keep y have run their
    backward, it holds y (+ mask) where the original held x and y; after, y (+ mask) where
    the original held x. So the peak falls by up to x's bytes or rises by at most the 1-bit
    mask, depending on where the region peaks (reports/peak.md); few-bit holds codes where
    the original held x. report() measures it."""
    return Decision(best.variant, best.bits, best.saved_after, f"{best.reason} ({CHECKPOINTED})")


def _mutated(saves: SiteSaves) -> str:
    if saves.y_leaves_graph:
        return ("output leaves the captured graph (a graph break or the return), where it may "
                "be modified in place")
    return "output is modified in place later"


def _inverted_reason(site: Site, saves: SiteSaves) -> str:
    bit = ", +1 bit/elem branch mask" if site.activation.saves_mask(saves.dtype) else ""
    if saves.y_kept_by:
        return f"output already kept by {saves.y_kept_by[0]}{bit}"
    return f"output kept instead of input{bit}"


def _fewbit_reason(saves: SiteSaves, bits: int) -> str:
    """True in every mode: few-bit may be forced (mode="fewbit", an override) where a
    consumer keeps the output, and a formula site may hold several tensors now."""
    held = 8 * size_hint(saves.saved_before) / max(size_hint(saves.numel), 1)  # sizes may be symbolic
    cost = f"{bits} bits/elem instead of {held:.3g}" if held else f"{bits} bits/elem"
    if saves.y_mutated:
        return f"{_mutated(saves)}; {cost}"
    if saves.y_kept_by:
        return f"few-bit as asked (mode or override), though {saves.y_kept_by[0]} keeps the output; {cost}"
    return f"no consumer keeps the output; {cost}"
