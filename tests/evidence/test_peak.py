"""The peak-by-depth section: deepening, and a ratio that reflects the measurement."""
from torch import nn

from fewbit_fx.evidence import models, peak as bench_peak


def test_deepened_copies_blocks_and_leaves_the_original():
    model, _, _ = models.build("bert", "tiny")
    depth = len(bench_peak.blocks(model))
    deep = bench_peak.deepened(model, depth + 3)
    assert len(bench_peak.blocks(deep)) == depth + 3
    assert len(bench_peak.blocks(model)) == depth
    assert deep.config.num_hidden_layers == depth + 3


def test_rows_measure_both_depths_and_render(tmp_path):
    # small: activations long enough for the compiled kernels (the torch-op path for short
    # tensors allocates temporaries of their size, which at tiny scale outweigh the saving)
    rows = bench_peak.rows(["bert"], "small", deep=8, modes=("auto",))
    assert [r["blocks"] for r in rows] == [4, 8]
    for r in rows:
        assert r["saved_after"] < r["saved_before"]
        assert r["peak_after"] < r["peak_before"]
        assert r["peak_at_before"].startswith(("forward: ", "backward: "))
    # the saving is nearly the same per block, so a deeper model keeps more of it at the peak
    assert rows[1]["ratio"] > rows[0]["ratio"]
    text = bench_peak.render(rows, "small")
    assert "| bert" in text and "peak drop / saved drop" in text


def test_blocks_needs_a_module_list():
    import pytest

    with pytest.raises(ValueError, match="ModuleList"):
        bench_peak.blocks(nn.Linear(2, 2))


def test_checkpointed_rows_measure_the_peak_and_render():
    rows = bench_peak.checkpointed_rows(["bert"], "tiny", modes=("auto", "fewbit"))
    by_mode = {r["mode"]: r for r in rows}
    # (whether the peak falls needs longer tensors than tiny's: tests/passes/test_checkpointed.py)
    assert by_mode["fewbit"]["peak_before"] == by_mode["auto"]["peak_before"] > 0
    assert all(r["peak_after"] > 0 and r["blocks"] == 2 for r in rows)
    text = bench_peak.render([], "tiny", rows)
    assert "With gradient checkpointing" in text and "| bert" in text
