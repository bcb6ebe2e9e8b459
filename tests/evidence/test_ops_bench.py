"""bench-ops sets process-wide state (torch threads, glibc's allocator), so it runs in a
child process here, as it does in `python -m fewbit_fx bench`."""
import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # subprocesses or training runs


def _child(tmp_path, *args: str) -> str:
    res = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, check=True)
    return res.stdout


def test_small_run_writes_every_variant(tmp_path):
    out = tmp_path / "ops.json"
    printed = _child(tmp_path, "-m", "fewbit_fx", "bench-ops", "--acts", "gelu,relu", "--dtypes", "fp32",
                     "--sizes", "12", "--bits", "1,3", "--repeats", "2", "--warmup", "0", "--json", str(out))
    data = json.loads(out.read_text())
    assert data["meta"]["clock"] == "thread cpu time" and data["meta"]["repeats"] == 2
    rows = data["rows"]
    assert [(r["act"], r["variant"]) for r in rows] == [
        (act, v) for act in ("gelu", "relu") for v in ("plain", "fewbit1", "fewbit3", "inverted")]
    for r in rows:
        assert r["numel"] == 4096 and r["fwd_ns_per_elem"] > 0 and r["bwd_ns_per_elem"] > 0
    plain = {r["act"]: r for r in rows if r["variant"] == "plain"}
    for r in rows:  # each ratio is the variant's time over the plain activation's
        p = plain[r["act"]]
        assert r["fwd_ratio"] == pytest.approx(r["fwd_ns_per_elem"] / p["fwd_ns_per_elem"], rel=0.02)
        assert r["bwd_ratio"] == pytest.approx(r["bwd_ns_per_elem"] / p["bwd_ns_per_elem"], rel=0.02)
    assert "fewbit3" in printed and "inverted" in printed


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_keep_freed_memory_on_glibc(tmp_path):
    assert _child(tmp_path, "-c", "from fewbit_fx.evidence import ops_bench; print(ops_bench.keep_freed_memory())").strip() == "True"
