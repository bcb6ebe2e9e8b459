"""reports/summary.json: one file that several bench sections write their rows into,
each section in its own process; this is the one place that reads, merges and writes it."""
from __future__ import annotations

import json
from pathlib import Path


def update(out: Path, sections: dict) -> dict:
    """Replace `sections`' keys in out/summary.json, keep the others; the merged summary."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {}
    summary.update(sections)
    path.write_text(json.dumps(summary, indent=2))
    return summary
