"""Every catalog model (fewbit_fx.evidence.models) at "tiny" scale, eager mode, end to end:

(a) report(): the measured saving of one training step is at least the per-site estimate;
(b) optimize() leaves forward outputs bitwise unchanged (auto and exact);
(c) exact mode gives the original's parameter gradients within fp32 tolerance;
(d) the optimized model keeps its class, state_dict keys, train/eval mode and hooks, and
    Hugging Face models still save_pretrained (and load back);
(e) the decisions expected for each architecture (frozen consumer -> few-bit, trainable -> inverted);
(f) optimize() without example inputs analyses on the first call.

Dynamo captures cost ~1-3 s per tiny model, so each (model, mode) is analysed once and
shared by the tests through small caches. Run with -s to see the measured numbers.
"""
from __future__ import annotations

import fnmatch
import functools
import importlib.util

import pytest
import torch

import fewbit_fx
from fewbit_fx.evidence import models
from fewbit_fx.measure import float_tensors, scalar_loss
from fewbit_fx.nn import FewBit, Inverted

HAS_HF = importlib.util.find_spec("transformers") is not None
HF = set(models.HF_MODELS) if HAS_HF else set()
NAMES = [n for n in models.names() if HAS_HF or n not in models.HF_MODELS]
PLAIN = [n for n in NAMES if n not in HF]

# Expected decisions per site-name pattern (every site must match one pattern, every pattern
# at least one site).
EXPECTED = {
    "auto": {
        "gpt2": {"transformer.h.*.mlp.act": "inverted"},  # NewGELUActivation, kept by c_proj
        "bert": {"encoder.layer.*.intermediate.intermediate_act_fn": "inverted",
                 "pooler.activation": "kept"},  # tanh keeps y, which is returned anyway
        "llama": {"model.layers.*.mlp.act_fn": "inverted"},  # SiLU, y kept by the mul with up_proj
        "mistral": {"model.layers.*.mlp.act_fn": "inverted"},
        "vit": {"layers.*.mlp.activation_fn": "inverted", "pooler.activation": "kept"},
        "mlp-functional": {"<root>:gelu#*": "inverted", "<root>:sigmoid#*": "fewbit-3",
                           "<root>:tanh#*": "kept"},
        "reuse": {"blocks.*.act": "inverted"},
        "frozen": {"act": "fewbit-3", "act2": "inverted"},  # frozen consumer vs trainable head
        "cnn": {"blocks.*.relu": "kept", "blocks.0.act": "inverted", "blocks.1.act": "fewbit-3"},
    },
}
EXPECTED["exact"] = {
    **{k: v for k, v in EXPECTED["auto"].items() if k in HF or k == "reuse"},
    "mlp-functional": {"<root>:gelu#*": "inverted", "<root>:sigmoid#*": "kept", "<root>:tanh#*": "kept"},
    "frozen": {"act": "kept", "act2": "inverted"},
    "cnn": {"blocks.*.relu": "kept", "blocks.0.act": "inverted", "blocks.1.act": "kept"},
}
EXPECTED["fewbit"] = {
    "mlp-functional": {"<root>:gelu#*": "fewbit-3", "<root>:sigmoid#*": "fewbit-3",
                       "<root>:tanh#*": "kept"},  # tanh's y is kept by `out` anyway
    "reuse": {"blocks.*.act": "fewbit-3"},
    "frozen": {"act": "fewbit-3", "act2": "fewbit-3"},
    "cnn": {"blocks.*.relu": "kept", "blocks.*.act": "fewbit-3"},
}
REPORT_CASES = [(n, "auto") for n in NAMES] + [(n, m) for n in PLAIN for m in ("exact", "fewbit")]

GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5


def build(name, eval_mode=False):
    model, args, kwargs = models.build(name, "tiny")
    if eval_mode:
        model.eval()
    return model, args, kwargs




def run(model, args, kwargs):
    torch.manual_seed(0)
    return model(*args, **kwargs)


def step(model, args, kwargs):
    """Outputs and parameter gradients of one training step."""
    model.zero_grad(set_to_none=True)
    out = run(model, args, kwargs)
    scalar_loss(out).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in float_tensors(out)], grads


@functools.lru_cache(maxsize=None)
def reference(name):
    model, args, kwargs = build(name)
    return step(model, args, kwargs)


@functools.lru_cache(maxsize=None)
def auto_report(name, mode="auto"):
    model, args, kwargs = build(name)
    return fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode=mode)


def hook_target(name) -> str:
    """The module of the first rewritten site (the activation module, or a functional
    site's owner, whose forward is replaced)."""
    row = next(r for r in auto_report(name).rows if r.variant != "kept")
    return row.site.split(":")[0] if ":" in row.site else row.site


def _module(model, path):
    path = "" if path == "<root>" else path
    return model.get_submodule(path) if path else model


@functools.lru_cache(maxsize=None)
def optimized(name, mode):
    """(model, args, kwargs, hook calls list, original class, original state_dict keys)."""
    model, args, kwargs = build(name)
    cls, keys = type(model), list(model.state_dict())
    calls = []
    _module(model, hook_target(name)).register_forward_hook(lambda m, i, o: calls.append(type(m)))
    fewbit_fx.optimize(model, example_inputs=args, example_kwargs=kwargs, mode=mode)
    return model, args, kwargs, calls, cls, keys


def check_decisions(rows, expected):
    for r in rows:
        matches = [v for p, v in expected.items() if fnmatch.fnmatchcase(r.site, p)]
        assert matches, f"unexpected site {r.site} ({r.activation}, {r.variant})"
        assert r.variant == matches[0], f"{r.site}: {r.variant} ({r.reason}), expected {matches[0]}"
    for p in expected:
        assert any(fnmatch.fnmatchcase(r.site, p) for r in rows), f"no site matches {p}"


# --- (a) estimates vs measurement, and (e) the expected decisions -------------------------

@pytest.mark.parametrize("name, mode", REPORT_CASES)
def test_report_estimate_vs_measured(name, mode):
    rep = auto_report(name, mode)
    check_decisions(rep.rows, EXPECTED[mode][name])
    estimated = rep.total_before - rep.total_after
    measured = rep.measured_before - rep.measured_after
    print(f"\n[{name} {mode}] sites {len(rep.rows)} rewritten "
          f"{sum(r.variant != 'kept' for r in rep.rows)}; estimate {rep.total_before} -> "
          f"{rep.total_after} B; measured {rep.measured_before} -> {rep.measured_after} B "
          f"(saving {measured} B, {measured / max(estimated, 1):.3f}x the estimate)")
    assert estimated > 0  # every catalog model has a GELU or SiLU to gain from
    assert measured >= 0.99 * estimated


def test_frozen_consumer_fewbit_trainable_inverted():
    rows = {r.site: r for r in auto_report("frozen").rows}
    assert rows["act"].variant == "fewbit-3" and "no consumer keeps the output" in rows["act"].reason
    assert rows["act2"].variant == "inverted" and "head" in rows["act2"].reason
    model = optimized("frozen", "auto")[0]
    assert isinstance(model.act, FewBit) and model.act.bits == 3
    assert isinstance(model.act2, Inverted)
    assert not model.down.weight.requires_grad  # frozen stays frozen


# --- (b) forward unchanged, (c) exact gradients ------------------------------------------

@pytest.mark.parametrize("mode", ["auto", "exact"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_bitwise_unchanged(name, mode):
    model, args, kwargs, *_ = optimized(name, mode)
    expected, _ = reference(name)
    rewritten = [m for m in model.modules() if isinstance(m, (FewBit, Inverted))]
    assert rewritten, "optimize() rewrote nothing"
    with torch.no_grad():
        got = [t.detach() for t in float_tensors(run(model, args, kwargs))]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    got, _ = step(model, args, kwargs)  # and with autograd recording (the rewritten path)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@pytest.mark.parametrize("name", NAMES)
def test_exact_mode_gradients(name):
    model, args, kwargs, *_ = optimized(name, "exact")
    _, expected = reference(name)
    _, got = step(model, args, kwargs)
    assert got.keys() == expected.keys()
    scale = max(e.abs().max().item() for e in expected.values())
    worst_abs = max((got[n] - e).abs().max().item() for n, e in expected.items())
    # relative error per parameter, over the entries whose gradient is not ~0 (some, like
    # attention key biases, have an exactly-zero true gradient and only rounding noise)
    worst_rel = max(
        (((got[n] - e).abs() / e.abs())[e.abs() > 1e-6 * scale].max().item()
         for n, e in expected.items() if (e.abs() > 1e-6 * scale).any()),
        default=0.0,
    )
    usage = max(((got[n] - e).abs() / (GRAD_ATOL + GRAD_RTOL * e.abs())).max().item()
                for n, e in expected.items())
    print(f"\n[{name} exact] grads of {len(expected)} parameters: max abs error {worst_abs:.3g} "
          f"(largest |grad| {scale:.3g}), max relative error {worst_rel:.3g}, "
          f"{usage:.3g} of the allclose tolerance")
    for n, e in expected.items():
        torch.testing.assert_close(got[n], e, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m: f"{n}: {m}")


# --- (d) the model stays the user's model ---------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_model_identity_preserved(name):
    model, args, kwargs, calls, cls, keys = optimized(name, "auto")
    assert type(model) is cls
    assert list(model.state_dict()) == keys
    assert model.training and all(m.training for m in model.modules())
    calls.clear()
    with torch.no_grad():
        run(model, args, kwargs)
    assert calls, f"forward hook on {hook_target(name)!r} did not fire after optimize"


@pytest.mark.parametrize("name", PLAIN + ["gpt2"] * HAS_HF)
def test_eval_mode_preserved(name):
    model, args, kwargs = build(name, eval_mode=True)
    expected = [t.detach() for t in float_tensors(run(model, args, kwargs))]
    fewbit_fx.optimize(model, example_inputs=args, example_kwargs=kwargs)
    assert not model.training and not any(m.training for m in model.modules())
    assert any(isinstance(m, (FewBit, Inverted)) for m in model.modules())
    got = [t.detach() for t in float_tensors(run(model, args, kwargs))]
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    model.train()
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", sorted(HF))
def test_save_pretrained(name, tmp_path):
    model, *_ = optimized(name, "auto")
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path)
    ours = model.state_dict()
    theirs = loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k


# --- (f) analysis on the first call --------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2"] * HAS_HF + ["mlp-functional", "frozen"])
def test_optimize_on_first_call(name):
    model, args, kwargs = build(name)
    expected_out, expected_grads = reference(name)
    assert fewbit_fx.optimize(model) is model
    assert "forward" in model.__dict__  # the first call's analysis is armed
    assert not any(isinstance(m, (FewBit, Inverted)) for m in model.modules())  # not yet
    with pytest.raises(ValueError):
        fewbit_fx.report(model)  # nothing analysed yet
    for _ in range(2):  # the first call analyses, the second runs the rewritten model
        out, grads = step(model, args, kwargs)
        assert all(torch.equal(g, e) for g, e in zip(out, expected_out))
        assert grads.keys() == expected_grads.keys()
    assert any(isinstance(m, (FewBit, Inverted)) for m in model.modules())
    rep = fewbit_fx.report(model)  # the analysis optimize() did on the first call
    check_decisions(rep.rows, EXPECTED["auto"][name])
    assert getattr(model.forward, "__name__", "") != "analyse_then_run"  # disarmed


def test_first_call_already_rewritten_for_root_functional_sites():
    model, args, kwargs = build("mlp-functional")
    _, expected_grads = reference("mlp-functional")
    fewbit_fx.optimize(model)
    _, grads = step(model, args, kwargs)
    # auto mode makes the root's torch.sigmoid few-bit: its gradient must differ
    assert not all(torch.equal(grads[n], e) for n, e in expected_grads.items())


# --- norms=True: LayerNorm / RMSNorm modules too ---------------------------------------------
NORMS_EXPECTED = {  # a norm whose output a Linear keeps is inverted; one returned is kept
    "gpt2": {"transformer.h.*.mlp.act": "inverted", "transformer.h.*.ln_*": "inverted",
             "transformer.ln_f": "inverted"},
    "bert": {"encoder.layer.*.intermediate.intermediate_act_fn": "inverted", "pooler.activation": "kept",
             "embeddings.LayerNorm": "inverted", "encoder.layer.0.*LayerNorm": "inverted",
             "encoder.layer.1.attention.output.LayerNorm": "inverted",
             "encoder.layer.1.output.LayerNorm": "kept"},
    "llama": {"model.layers.*.mlp.act_fn": "inverted", "model.layers.*layernorm": "inverted",
              "model.norm": "inverted"},
    "vit": {"layers.*.mlp.activation_fn": "inverted", "pooler.activation": "kept",
            "layers.*.layernorm_*": "inverted", "layernorm": "kept"},
}


@pytest.mark.parametrize("name", list(NORMS_EXPECTED))
def test_norms_estimate_vs_measured(name):
    model, args, kwargs = build(name)
    rep = fewbit_fx.report(model, example_inputs=args, example_kwargs=kwargs, mode="auto", norms=True)
    check_decisions(rep.rows, NORMS_EXPECTED[name])
    estimated = rep.total_before - rep.total_after
    measured = rep.measured_before - rep.measured_after
    plain = auto_report(name)
    assert measured > plain.measured_before - plain.measured_after  # more than activations alone
    assert measured >= 0.99 * estimated
