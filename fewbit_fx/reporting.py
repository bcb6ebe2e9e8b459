"""The dry-run report: per site, what is kept for backward now and after the rewrite."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tabulate import tabulate


@dataclass
class Row:
    site: str
    activation: str
    variant: str
    reason: str
    shape: tuple[int, ...]
    dtype: str
    saved_before: int
    saved_after: int
    checkpointed: bool = False  # inside an activation-checkpointed region


@dataclass
class Report:
    """Per-site estimate (from the saves analysis) plus, when measured, the saved bytes of
    one real training step of the original and the rewritten model."""

    rows: list[Row]
    mode: str
    bits: int
    measured_before: int | None = None
    measured_after: int | None = None
    peak_before: int | None = None   # measured for models with checkpointed sites
    peak_after: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_before(self) -> int:
        return sum(r.saved_before for r in self.rows)

    @property
    def total_after(self) -> int:
        return sum(r.saved_after for r in self.rows)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "bits": self.bits,
            "rows": [asdict(r) for r in self.rows],
            "total_before": self.total_before, "total_after": self.total_after,
            "measured_before": self.measured_before, "measured_after": self.measured_after,
            "peak_before": self.peak_before, "peak_after": self.peak_after,
            "notes": self.notes,
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self) -> str:
        table = tabulate(
            [(r.site, r.activation, r.variant, "x".join(map(str, r.shape)), r.dtype,
              _mib(r.saved_before), _mib(r.saved_after), r.reason) for r in self.rows],
            headers=["site", "activation", "variant", "shape", "dtype", "before", "after", "reason"],
        )
        lines = [table, "",
                 f"sites: {len(self.rows)}, rewritten: {sum(r.variant != 'kept' for r in self.rows)}"
                 f" (mode={self.mode}, bits={self.bits})",
                 f"estimate at these sites: {_mib(self.total_before)} -> {_mib(self.total_after)} saved for backward"]
        if self.measured_before is not None:
            lines.append(
                f"measured, one training step (all saved tensors, parameters excluded): "
                f"{_mib(self.measured_before)} -> {_mib(self.measured_after)} "
                f"({_pct(self.measured_after, self.measured_before)})"
            )
        if self.peak_before is not None:
            lines.append(
                f"measured peak of one training step (tensor bytes live at once): "
                f"{_mib(self.peak_before)} -> {_mib(self.peak_after)} "
                f"({_pct(self.peak_after, self.peak_before)})"
            )
        lines += self.notes
        return "\n".join(lines)


def _mib(n: int) -> str:
    """Bytes in the unit that shows them (a 4 KB site next to a 40 MB one is not 0.00)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}" if abs(n) < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n} B"


def _pct(after: int, before: int) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"
