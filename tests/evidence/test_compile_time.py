"""fewbit_fx.evidence.compile_time: cold-cache compile time, one fresh process per figure."""
import json
import subprocess

from fewbit_fx.evidence import compile_time as bench_compile_time
import pytest

pytestmark = pytest.mark.slow  # subprocesses or training runs


def test_each_measurement_gets_its_own_empty_cache(monkeypatch):
    seen = []

    def fake_run(cmd, capture_output, text, env, check):
        seen.append((cmd[-3:], env["TORCHINDUCTOR_CACHE_DIR"]))
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps({"first_step_s": 5.0, "warm_step_s": 1.0}))

    monkeypatch.setattr(subprocess, "run", fake_run)
    r1 = bench_compile_time.measure("gpt2", "tiny", "inductor")
    bench_compile_time.measure("gpt2", "tiny", "fewbit")
    assert r1 == {"first_step_s": 5.0, "warm_step_s": 1.0}
    assert [s[0] for s in seen] == [["gpt2", "tiny", "inductor"], ["gpt2", "tiny", "fewbit"]]
    assert seen[0][1] != seen[1][1]


def test_report_rows_and_summary(tmp_path, monkeypatch):
    walls = iter([10.0, 12.0, 11.0, 12.5])  # inductor, fewbit, inductor, fewbit
    monkeypatch.setattr(bench_compile_time, "measure", lambda *a: {
        "first_step_s": next(walls) + 1.0, "warm_step_s": 1.0, "python_cpu_s": 4.0, "cxx_cpu_s": 6.0})
    (tmp_path / "summary.json").write_text(json.dumps({"memory": [1]}))
    bench_compile_time.main(["--models", "gpt2", "--repeats", "2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["memory"] == [1]  # other sections' rows are kept
    row = summary["compile_time"][0]
    assert row["compile_s_before"] == 10.5 and row["compile_s_after"] == 12.25
    assert row["ratio"] == (12.0 / 10.0 + 12.5 / 11.0) / 2  # median of the per-round ratios
    assert row["cpu_ratio"] == 1.0 and row["python_cpu_s_after"] == 4.0
    assert "| gpt2" in (tmp_path / "compile_time.md").read_text()


def test_child_counts_cpu_of_compilation_only():
    """A real child process: the cold step's CPU time above a warm step's, and gcc's."""
    r = bench_compile_time.measure("mlp-functional", "tiny", "inductor")
    assert r["first_step_s"] > r["warm_step_s"] > 0
    assert r["python_cpu_s"] > 0 and r["cxx_cpu_s"] > 0  # serial compile: gcc is our child
