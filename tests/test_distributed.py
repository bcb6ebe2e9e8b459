"""optimize() under the distributed/wrapper stacks of issue 14, on CPU.

1. DDP (gloo, 2 processes on 127.0.0.1, a free port picked at run time): optimize the bare
   model and then wrap it, or wrap it and optimize the DDP object. One training step per
   rank on its half of the batch: the all-reduced gradients equal (1e-5 relative) those of
   one process running the same optimized model on the full batch (mean loss), and the
   decisions (report(model).rows) are the bare model's. Also with one gradient bucket per
   parameter, where Dynamo's DDPOptimizer splits the captured graph at bucket boundaries.
2. FSDP2 (`fully_shard` on a 2-rank CPU mesh, gloo): optimize before and after
   fully_shard, on the root only and nested (every Linear, then the root, as FSDP2 is
   used on a model's blocks): full gradients (`full_tensor()`) equal one process on the
   full batch, and the same decisions.
   Also: what report() says when given the wrapper itself (its stored report, and a dry
   run with example inputs): the same decisions as the bare model.
3. accelerate (one process): `Accelerator(cpu=True)` and `Accelerator(cpu=True,
   mixed_precision="bf16")`, optimize (mode="exact") before and after `prepare`: forward
   output bitwise equal to the un-optimized prepared model's, gradients within 1e-5
   (fp32) or the bf16 rounding floor (bf16), and the same decisions as the bare model.

The model (tests/_dist_helpers.py, Net) has an activation module kept by the next Linear
(inverted), a functional F.silu feeding only a frozen Linear (few-bit in auto, kept in
exact) and a functional F.gelu kept by the trainable head (inverted), so module swaps and
rewrites of the root's own forward are both exercised.

Both ranks of every distributed case run in one 2-process job (the module-scoped fixture
`dist_results`, ~15 s, nearly all of it the two interpreters' start-up and first Dynamo
trace); each case has its own process group. A rank waits at most
COLLECTIVE_TIMEOUT_S on a collective, and the job is killed after LAUNCH_TIMEOUT_S.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import sys

import pytest
import torch

import fewbit_fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _dist_helpers as h  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses or training runs

RTOL = 1e-5  # relative gradient tolerance (norm-wise, per parameter) for fp32

# Known limits, kept visible: each is a strict xfail, so a fix makes it fail until unmarked.
NESTED_FSDP = pytest.mark.xfail(strict=True, reason=(
    "optimize() after nested fully_shard: Dynamo graph-breaks at every FSDP-managed submodule "
    "and runs its forward untraced, so those consumers are unseen: their inputs count as "
    "possibly modified, and an inverted site of the bare model becomes few-bit (approximate "
    "gradient). Optimize before fully_shard (README)."))
DRY_RUN_WRAPPED = pytest.mark.xfail(strict=True, reason=(
    "report(DDP(optimized model), example_inputs=...) measures the model as it was before "
    "optimize, which takes out FewBit's table buffers; DDP broadcasts the buffers it saw at "
    "wrapping and asserts. Report on the bare model."))
DIST_CASES = [pytest.param(c, marks=NESTED_FSDP) if c == "fsdp-nested-after" else c for c in h.CASES]
REPORT_CASES = ["ddp-before", "ddp-after", "fsdp-before", "fsdp-after"]
HAS_GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()
needs_gloo = pytest.mark.skipif(not HAS_GLOO, reason="torch.distributed with the gloo backend is not available")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_grads_close(got: dict, want: dict, rtol: float, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: gradients for {sorted(got)}, expected {sorted(want)}"
    errors = {k: rel_err(got[k], want[k]) for k in want}
    bad = {k: e for k, e in errors.items() if not e <= rtol}
    assert not bad, f"{what}: relative gradient error above {rtol:g}: {bad} (all: {errors})"


# --------------------------------------------------------------------------- the reference


@pytest.fixture(scope="module")
def ref():
    """One process, full batch, mode="auto"."""
    return h.reference("auto")


def assert_expected(decisions: dict[str, str], mode: str) -> None:
    """The bare model's decisions are the ones the test model was built to get."""
    expected = h.EXPECTED[mode]
    for site, variant in decisions.items():
        matches = [v for pat, v in expected.items() if fnmatch.fnmatchcase(site, pat)]
        assert matches == [variant], (site, variant, expected)
    assert len(decisions) == len(expected), (decisions, expected)


def test_the_model_exercises_every_kind_of_site(ref):
    # The test model is worth something only if it has an inverted module swap, a few-bit
    # functional site and an inverted functional site, and few-bit changes the gradients
    # (so a wrapper that silently lost the rewrite would be caught by the gradient check).
    assert ref["decisions"] == ref["planned"]
    assert_expected(ref["decisions"], "auto")
    assert ref["kinds"] == ["FewBit", "Inverted", "Inverted"]
    assert ref["measured"][1] < ref["measured"][0], ref["measured"]
    diff = max(rel_err(ref["grads"][k], ref["plain_grads"][k]) for k in ref["grads"])
    assert diff > 100 * RTOL, f"few-bit barely changes the gradients ({diff:.2e}): the check would not see it"


# --------------------------------------------------------------------------- DDP and FSDP2


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    if not HAS_GLOO:
        pytest.skip("torch.distributed with the gloo backend is not available")
    return h.launch(list(h.CASES), str(tmp_path_factory.mktemp("dist")))


def _ok(results: list[dict], case: str) -> list[dict]:
    for r in results:
        assert "error" not in r, f"{case}, rank {r['rank']} failed:\n{r['error']}"
    return results


@needs_gloo
@pytest.mark.parametrize("case", DIST_CASES)
def test_gradients_and_decisions_equal_one_process_on_the_full_batch(case, dist_results, ref):
    results = _ok(dist_results[case], case)
    for r in results:
        what = f"{case}, rank {r['rank']}"
        assert r["decisions"] == ref["decisions"], (
            f"{what}: decisions {r['decisions']} differ from the bare model's {ref['decisions']}: "
            + "; ".join(f"{site}: {why}" for site, why in r["reasons"].items()
                        if r["decisions"].get(site) != ref["decisions"].get(site)))
        assert r["kinds"] == ref["kinds"], f"{what}: rewritten modules {r['kinds']}, bare {ref['kinds']}"
        assert_grads_close(r["grads"], ref["grads"], RTOL, what)
        if case.startswith("fsdp"):
            assert r["sharded"], f"{what}: no DTensor parameters, fully_shard did nothing"
    # the ranks agree with each other exactly (the gradients were reduced, not local)
    g0, g1 = results[0]["grads"], results[1]["grads"]
    assert all(torch.equal(g0[k], g1[k]) for k in g0), f"{case}: the ranks' gradients differ"


@needs_gloo
@pytest.mark.parametrize("case", REPORT_CASES)
def test_report_of_the_wrapper_itself(case, dist_results, ref):
    # report(wrapper) on the object the user holds: its record of what optimize did ...
    r = _ok(dist_results[case], case)[0]
    stored = r["wrapper_report"]
    assert "error" not in stored, f"{case}: fewbit_fx.report(wrapper) raised:\n{stored['error']}"
    assert stored["value"] == ref["decisions"], (stored["value"], ref["decisions"])


@needs_gloo
@pytest.mark.parametrize("case", [pytest.param(c, marks=DRY_RUN_WRAPPED) if c == "ddp-before" else c
                                  for c in REPORT_CASES])
def test_dry_run_report_of_the_wrapper(case, dist_results, ref):
    # ... and a dry run with example inputs: what optimize() would decide, measured.
    r = _ok(dist_results[case], case)[0]
    dry = r["dry_run"]
    assert "error" not in dry, (f"{case}: fewbit_fx.report(wrapper, example_inputs=(x,)) raised:\n"
                                f"{dry['error']}")
    assert dry["value"]["decisions"] == ref["planned"], (dry["value"]["decisions"], ref["planned"])
    before, after = dry["value"]["measured"]
    assert after < before, dry["value"]["measured"]


# --------------------------------------------------------------------------- accelerate

HAS_ACCELERATE = importlib.util.find_spec("accelerate") is not None


@pytest.fixture
def accelerator_factory():
    """Accelerator(cpu=True, ...) with accelerate's process-wide state reset before and after."""
    if not HAS_ACCELERATE:
        pytest.skip("accelerate is not installed (pip install -e '.[dev]')")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # noqa: SLF001 - its singleton pins mixed_precision
    yield lambda **kw: Accelerator(cpu=True, **kw)
    AcceleratorState._reset_state(True)  # noqa: SLF001


def _step(model, x, y):
    out = model(x)
    h.loss_fn(out, y).backward()
    return out.detach(), h.grads(model)


@pytest.mark.parametrize("when", ["after", "before"], ids=["optimize-after-prepare", "optimize-before-prepare"])
@pytest.mark.parametrize("precision", ["no", "bf16"], ids=["fp32", "bf16"])
def test_accelerate_prepare(precision, when, accelerator_factory):
    accelerator = accelerator_factory(mixed_precision=precision)
    x, y = h.make_batch()
    bare = h.reference("exact")["decisions"]
    assert_expected(bare, "exact")

    reference = accelerator.prepare(h.make_model())
    out_ref, grads_ref = _step(reference, x, y)

    model = h.make_model()
    if when == "before":
        h.optimize(model, x, "exact")
        prepared = accelerator.prepare(model)
    else:
        prepared = accelerator.prepare(model)
        h.optimize(prepared, x, "exact")
    assert type(prepared) is h.Net  # one process: prepare returns the model itself
    out, grads = _step(prepared, x, y)

    assert out.dtype == out_ref.dtype == torch.float32  # accelerate converts outputs to fp32
    assert torch.equal(out, out_ref), (f"forward differs from the un-optimized prepared model by "
                                       f"{float((out - out_ref).abs().max()):.3g}")
    if precision == "bf16":  # the comparison above means something only if autocast is on
        plain = h.make_model()
        assert not torch.equal(plain(x), out_ref), "bf16 autocast had no effect on the forward"

    got = h.decisions(prepared)
    assert got == bare, f"decisions {got} differ from the bare model's {bare}: " + "; ".join(
        f"{r.site}: {r.reason}" for r in fewbit_fx.report(prepared).rows if got.get(h.strip_name(r.site)) != bare.get(h.strip_name(r.site)))
    assert h.rewritten_kinds(prepared) == ["Inverted", "Inverted"]

    if precision == "no":
        assert_grads_close(grads, grads_ref, RTOL, "fp32")
    else:
        # The floor: how far bf16 autocast's rounding already moves the un-optimized
        # model's gradients from fp32. The inverted variants read f' from the bf16-rounded
        # output, an error of that same order; measured 0.7-1.4x the floor over 6 seeds.
        plain = h.make_model()
        _, grads_fp32 = _step(plain, x, y)
        floor = max(rel_err(grads_ref[k], grads_fp32[k]) for k in grads_fp32)
        assert 1e-4 < floor < 5e-2, floor
        assert_grads_close(grads, grads_ref, 2 * floor, f"bf16 (floor {floor:.2e})")
