"""fewbit_fx.evidence.anchors: the comparison with published figures (tiny scale here)."""
import torch

from fewbit_fx.evidence import anchors as bench_anchors, models


def test_adapters_freeze_the_base_and_wrap_the_decoder_linears():
    model, _, _ = models.build("mistral", "tiny")
    model = bench_anchors.with_adapters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(isinstance(m, bench_anchors.LoRA) for m in model.modules())
    assert not isinstance(model.lm_head, bench_anchors.LoRA)  # outside the decoder layers


def test_measure_and_table():
    row = bench_anchors.measure("mistral", "auto", True, scale="tiny")
    assert row["saved_bytes_after"] < row["saved_bytes_before"]
    text = bench_anchors.table([row] * len(bench_anchors.ANCHORS))
    assert "-15.7% activation memory" in text and "mistral base + LoRA, auto" in text


def test_readme_section_is_replaced_between_markers(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench_anchors.README_START}\nold\n{bench_anchors.README_END}\nrest\n")
    fake = {"model": "bert", "mode": "auto", "adapters": False, "saved_bytes_before": 100,
            "saved_bytes_after": 80, "peak_bytes_before": 200, "peak_bytes_after": 190}
    monkeypatch.setattr(bench_anchors, "measure", lambda *a, **k: dict(fake))
    bench_anchors.main(["--out", str(tmp_path / "reports"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "-20.0%" in text and "-5.0%" in text
    assert (tmp_path / "reports" / "anchors.md").exists()
