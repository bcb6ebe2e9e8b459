"""The command line: report prints a table or JSON; bad model names fail clearly."""
import json

import pytest

from fewbit_fx import cli


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
    with pytest.raises(cli.CliError, match="unknown model"):
        cli.load_model("no-such-model", "tiny")


def wrong_shape():
    """A factory whose example input does not fit the model."""
    import torch
    from torch import nn

    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)), (torch.randn(2, 5),)


def failing():
    raise RuntimeError("no weights here")


def not_a_pair():
    return "model"


@pytest.mark.parametrize("argv,message", [
    (["report", "test_cli:tiny_model", "--bits", "9"], "bits must be an integer from 1 to 8"),
    (["report", "test_cli:tiny_model", "--override", "1=fewbit-12"], "'fewbit-12' is not a variant"),
    (["report", "test_cli:tiny_model", "--override", "nonsense"], "write PATTERN=VARIANT"),
    (["report", "hf:notamodel"], "unknown Hugging Face model type 'notamodel'"),
    (["report", "mymod_nowhere:nosuch"], "cannot import module 'mymod_nowhere'"),
    (["report", "test_cli:nosuch"], "test_cli has no callable 'nosuch'"),
    (["report", "test_cli:failing"], "raised RuntimeError: no weights here"),
    (["report", "test_cli:not_a_pair"], "returns (model, args) or (model, args, kwargs)"),
    (["report", "test_cli:wrong_shape"], "could not run test_cli:wrong_shape on its example inputs"),
    (["report", "no-such-model"], "unknown model 'no-such-model'"),
])
def test_mistakes_end_in_one_line_and_exit_code_2(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert message in err[-1], err
    assert "Traceback" not in "\n".join(err)
    if "wrong_shape" in argv[1]:
        assert len(err) == 1  # no pages of Dynamo's logs before it


def test_bad_arguments_fail_before_the_model_is_built(monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("the model was built"))
    assert cli.main(["report", "gpt2", "--override", "x=fewbit-12"]) == 2


def test_report_names_model_scale_and_inputs(capsys):
    assert cli.main(["report", "test_cli:tiny_model", "--no-measure"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "test_cli:tiny_model (Sequential" in first and "inputs: 2x8 float32" in first


def test_bench_arguments_reach_its_own_parser(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--scale", "nonsense"])
    assert e.value.code == 2  # argparse rejected the value: it was parsed, not reordered
    err = capsys.readouterr().err
    assert "fewbit-fx bench" in err and "invalid choice: 'nonsense'" in err


def test_report_with_checkpointing_measures_the_peak(capsys):
    assert cli.main(["report", "gpt2", "--scale", "tiny", "--checkpointing", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"] and all(r["checkpointed"] for r in rep["rows"])
    assert rep["peak_before"] > 0 and rep["peak_after"] > 0
    assert any("activation-checkpointed" in n for n in rep["notes"])


def test_checkpointing_needs_a_hugging_face_model(capsys):
    assert cli.main(["report", "test_cli:tiny_model", "--checkpointing"]) == 2
    assert "needs a Hugging Face model" in capsys.readouterr().err
