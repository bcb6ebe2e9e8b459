"""fewbit_fx.evidence.bench: the memory and speed parts run in separate processes and merge."""
import json

from fewbit_fx.evidence import bench


def _summary(memory, speed):
    return {"scale": "quick", "model_scale": "tiny", "repeats": 3,
            "environment": {"device": "cpu"}, "memory": memory, "speed": speed}


def test_memory_and_speed_parts_merge_into_one_report(tmp_path):
    mem = [{"model": "gpt2", "baseline": "eager", "mode": "optimize-auto",
            "saved_bytes_before": 2**20, "saved_bytes_after": 2**19,
            "peak_bytes_before": 2**21, "peak_bytes_after": 2**20}]
    spd = [{"model": "gpt2", "baseline": "eager", "mode": "optimize-auto", "device": "cpu",
            "step_s_before": 0.1, "step_s_after": 0.105, "ratio": 1.05,
            "first_call_s_before": 1.0, "first_call_s_after": 2.0}]
    bench.write_reports(tmp_path, _summary(mem, []))   # the memory process
    bench.write_reports(tmp_path, _summary([], spd))   # then the speed process
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["memory"] == mem and summary["speed"] == spd
    text = (tmp_path / "benchmarks.md").read_text()
    assert "-50.0%" in text and "1.05 " in text


def test_only_the_memory_sections_get_the_allocator_setting():
    names = [s[0] for s in bench._sections("quick", "reports")]
    assert {"memory", "speed", "compile-time", "anchors"} <= set(names)
    memory = next(s for s in bench._sections("quick", "reports") if s[0] == "memory")
    speed = next(s for s in bench._sections("quick", "reports") if s[0] == "speed")
    assert memory[2][-2:] == ["--parts", "memory"] and speed[2][-2:] == ["--parts", "speed"]


def test_only_the_repository_reports_update_the_readme(tmp_path):
    def anchors(out):
        return next(s for s in bench._sections("quick", out) if s[0] == "anchors")[2]

    assert "--readme" not in anchors(str(tmp_path))
    assert "--readme" in anchors(str(bench._ROOT / "reports"))


def test_every_section_names_its_files_and_runs_a_known_sub_command():
    for name, _, cmd, stdout_file in bench._sections("full", "reports"):
        assert bench._FILES[name], name
        if cmd[1:4] == ["-m", "fewbit_fx", "bench"]:  # a sub-command of this module's main
            assert cmd[4] in {"memory", "compiled", "tables-plot", "compile-time", "anchors",
                              "peak", "budget"}, cmd
    budget = next(s for s in bench._sections("full", "reports") if s[0] == "budget")
    assert budget[2][4:7] == ["budget", "--scale", "small"]
