"""The convergence harness runs end to end on a few steps (the study itself is in reports/)."""
import math

import pytest

from fewbit_fx.evidence import convergence

pytestmark = pytest.mark.slow  # subprocesses or training runs


def test_corpus_is_real_offline_text():
    data = convergence.corpus(max_bytes=50_000)
    assert data.numel() == 50_000 and data.max() < 256
    assert b"def " in bytes(data.to(dtype=__import__("torch").uint8).tolist())


def test_each_variant_trains_and_summaries_compare_to_exact():
    cfg = dict(steps=3, seeds=1, layers=1, width=32, seq=16, batch=2)
    data = convergence.corpus(max_bytes=20_000)
    base = convergence.train("pretrain", "exact", 0, cfg, data[:18_000], data[18_000:])
    state = base.pop("model").state_dict()
    runs = [base, convergence.train("pretrain", "fewbit-3", 0, cfg, data[:18_000], data[18_000:])]
    runs += [convergence.train("adapter", v, 0, cfg, data[:18_000], data[18_000:], state)
             for v in ("exact", "fewbit-1")]
    for r in runs:
        r.pop("model", None)
    assert all(math.isfinite(r["final_loss"]) and len(r["curve"]) == 3 for r in runs)
    rows = convergence.summarize(runs)
    final = {(r["task"], r["variant"]): r["final_loss"] for r in runs}
    for row in rows:  # each variant against exact of the same task, from the runs themselves
        base = final[(row["task"], "exact")]
        assert row["relative_change"] == pytest.approx((final[(row["task"], row["variant"])] - base) / base)
    assert next(r for r in rows if r["variant"] == "fewbit-3")["relative_change"] != 0
    assert {r["variant"] for r in rows if r["task"] == "adapter"} == {"exact", "fewbit-1"}


def test_main_runs_every_job_in_worker_processes_and_keeps_each_run(tmp_path, monkeypatch):
    import json

    monkeypatch.setitem(convergence.SCALES, "quick", dict(steps=2, seeds=1, layers=1, width=32, seq=16, batch=2))
    assert convergence.main(["--scale", "quick", "--out", str(tmp_path), "--workers", "2"]) == 0
    runs = json.loads((tmp_path / "convergence_runs.json").read_text())
    jobs = [(r["task"], r["variant"]) for r in runs]
    assert len(jobs) == 11 and jobs[0] == ("pretrain", "exact")  # in job order
    assert ("adapter", "fewbit-1") in jobs and ("adapter", "inverted") not in jobs
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["variant"] for r in summary["convergence"]} >= {"exact", "inverted", "fewbit-3"}
    assert "tables='fitted'" in (tmp_path / "convergence.md").read_text()
    # Rebuilt from the saved runs, the markdown names the options that reproduce them.
    assert convergence.main(["--scale", "quick", "--out", str(tmp_path), "--summarize-only",
                             "--tables", "normal", "--adapter-lr", "0.003"]) == 0
    md = (tmp_path / "convergence.md").read_text()
    assert "--adapter-lr 0.003 --tables normal" in md and "N(0, 1) ones" in md


def test_outliers_name_runs_that_diverged_from_exact():
    runs = [{"task": "adapter", "variant": "exact", "seed": 0, "final_loss": 1.8},
            {"task": "adapter", "variant": "fewbit-3", "seed": 0, "final_loss": 3.6},
            {"task": "adapter", "variant": "fewbit-2", "seed": 0, "final_loss": 1.82}]
    assert convergence.outliers(runs) == ["adapter fewbit-3 seed 0: 3.600 vs exact 1.800"]


def test_tables_option_reaches_the_fewbit_modules():
    from fewbit_fx.nn import REFIT_EVERY, FewBit

    cfg = dict(steps=1, seeds=1, layers=1, width=32, seq=16, batch=2)
    data = convergence.corpus(max_bytes=20_000)
    refits = {}
    for tables in ("fitted", "fitted-once", "normal"):
        run = convergence.train("pretrain", "fewbit-2", 0, {**cfg, "tables": tables}, data[:18_000], data[18_000:])
        modules = [m for m in run["model"].modules() if isinstance(m, FewBit)]
        assert modules
        refits[tables] = {(m.refit_every, m.fitted_on is not None) for m in modules}
    assert refits == {"fitted": {(REFIT_EVERY, True)}, "fitted-once": {(None, True)},
                      "normal": {(None, False)}}
