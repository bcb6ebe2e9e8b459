"""The command line: report prints a table or JSON; bad model names fail clearly."""
import json

import pytest

from fewbit_fx import bench, cli


def test_report_json_for_a_catalog_model(capsys):
    assert cli.main(["report", "frozen", "--scale", "tiny", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    variants = {r["site"]: r["variant"] for r in rep["rows"]}
    assert "fewbit-3" in variants.values() and "inverted" in variants.values()
    assert rep["measured_after"] < rep["measured_before"]
    fewbit_rows = [r for r in rep["rows"] if r["variant"].startswith("fewbit")]
    assert all("table fitted to" in r["reason"] for r in fewbit_rows)


def test_report_with_normal_tables(capsys):
    assert cli.main(["report", "frozen", "--scale", "tiny", "--tables", "normal", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "tables='normal'" in out and "table fitted" not in out


def tiny_model():
    """A `module:factory` target: returns (model, args)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)), (torch.randn(2, 8),)


def test_report_with_module_factory_and_override(capsys):
    assert cli.main(["report", "test_cli:tiny_model", "--override", "1=keep", "--no-measure"]) == 0
    out = capsys.readouterr().out
    assert "kept by an override" in out and "gelu" in out


def test_unknown_model_names_the_choices():
    with pytest.raises(SystemExit, match="unknown model"):
        cli.load_model("no-such-model", "tiny")


def test_bench_arguments_reach_its_own_parser():
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--scale", "nonsense"])
    assert e.value.code == 2  # argparse rejected the value: it was parsed, not reordered
    assert bench.SCALES["quick"][0] == "tiny"


def test_report_with_checkpointing_measures_the_peak(capsys):
    assert cli.main(["report", "gpt2", "--scale", "tiny", "--checkpointing", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"] and all(r["checkpointed"] for r in rep["rows"])
    assert rep["peak_before"] > 0 and rep["peak_after"] > 0
    assert any("activation-checkpointed" in n for n in rep["notes"])


def test_checkpointing_needs_a_hugging_face_model():
    with pytest.raises(SystemExit, match="needs a Hugging Face model"):
        cli.main(["report", "test_cli:tiny_model", "--checkpointing"])
