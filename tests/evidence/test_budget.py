"""The budget section: rows per model and b, composition never above the budget alone."""
import json

from fewbit_fx.evidence import budget


def test_rows_compare_each_budget_with_the_budget_alone_and_render(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "BUDGETS", (1.0, 0.5))
    rows = budget.bench_model("gpt2+lora", "tiny", repeats=1)
    assert [(r["budget"], r["config"]) for r in rows] == [
        (b, c) for b in (1.0, 0.5) for c in ("budget alone", "fewbit + budget", "fewbit+norms + budget")]
    alone = {r["budget"]: r for r in rows if r["config"] == "budget alone"}
    for r in rows:
        a = alone[r["budget"]]
        assert r["saved_bytes"] <= a["saved_bytes"], r
        assert r["peak_bytes"] > 0 and r["step_s"] > 0
        if r["config"] == "budget alone":
            assert r["grad_error"] < 1e-5, r  # Inductor vs eager: rounding only
        else:
            assert r["grad_error"] < 0.1, r  # few-bit MLP sites (3 bits)
            # a graph compiled as the original keeps what the budget alone keeps
            if r["rewritten_sites"] == 0:
                assert r["saved_bytes"] == a["saved_bytes"], r
    # frozen base at the default budget: recompute cannot drop the MLP's x, few-bit can
    assert rows[1]["saved_bytes"] < rows[0]["saved_bytes"] and rows[1]["rewritten_sites"] > 0
    # the norms' inputs go too (their outputs are kept by c_attn's LoRA A and by c_fc)
    assert rows[2]["saved_bytes"] < rows[1]["saved_bytes"] and rows[2]["rewritten_sites"] > rows[1]["rewritten_sites"]

    budget.write(tmp_path, rows, "tiny", 1, {"torch": "x"})
    text = (tmp_path / "compile_budget.md").read_text()
    assert "| gpt2+lora" in text and "best budget alone, B" in text and "best fewbit+norms" in text
    data = json.loads((tmp_path / "compile_budget.json").read_text())
    assert data["rows"] == json.loads(json.dumps(rows))
