"""Activations inside activation-checkpointed regions (torch.utils.checkpoint, as Hugging
Face's gradient_checkpointing_enable() uses): found, rewritten eagerly with exact
gradients and a lower backward peak, kept under torch.compile (which recomputes them)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import fewbit_fx
from fewbit_fx.measure import measure_step, scalar_loss
from fewbit_fx.nn import FewBit, Inverted
from fewbit_fx.passes.decide import CHECKPOINTED
from fewbit_fx.passes.plan import RECOMPUTED

activations = pytest.importorskip("transformers.activations")

W = 256


class Block(nn.Module):
    """Linear -> activation module -> Linear, times a functional SiLU gate: one module
    site, one functional site."""

    def __init__(self, act):
        super().__init__()
        self.fc1 = nn.Linear(W, 4 * W)
        self.act = act
        self.fc2 = nn.Linear(4 * W, W)
        self.gate = nn.Linear(W, W)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x))) * F.silu(self.gate(x))


class Checkpointed(nn.Module):
    def __init__(self, depth=3, reentrant=False, enabled=True, act=activations.NewGELUActivation):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(Block(act()) for _ in range(depth))
        self.reentrant, self.enabled = reentrant, enabled

    def forward(self, x):
        for block in self.blocks:
            if self.enabled:
                x = checkpoint(block, x, use_reentrant=self.reentrant)
            else:
                x = block(x)
        return x


def x_in(rows=8, requires_grad=False):
    """Reentrant checkpointing gives parameters gradients only when an input requires grad."""
    x = torch.randn(rows, W, generator=torch.Generator().manual_seed(1))
    return x.requires_grad_(requires_grad)


def grads(model, x):
    model.zero_grad(set_to_none=True)
    scalar_loss(model(x)).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("reentrant", [False, True])
def test_sites_inside_checkpointed_regions_are_found_and_rewritten_with_exact_gradients(reentrant):
    model, x = Checkpointed(reentrant=reentrant), x_in(requires_grad=reentrant)
    rep = fewbit_fx.report(model, example_inputs=(x,), mode="exact")
    rows = {r.site: r for r in rep.rows}
    assert all(r.checkpointed for r in rep.rows)
    for i in range(3):
        for site in (f"blocks.{i}.act", f"blocks.{i}:silu#0"):
            assert rows[site].variant == "inverted" and CHECKPOINTED in rows[site].reason
    assert any("inside activation-checkpointed regions" in n for n in rep.notes)
    # across the step only the regions' inputs are saved: the rewrite cannot change that
    assert rep.measured_after == rep.measured_before

    reference = grads(model, x)
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact")
    assert isinstance(optimized.blocks[0].act, Inverted)
    torch.testing.assert_close(optimized(x), model(x), rtol=0, atol=0)
    for got, want in zip(grads(optimized, x), reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_functional_sites_inside_checkpointed_regions_are_rewritten():
    model, x = Checkpointed(), x_in()
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="fewbit",
                                   tables="normal")
    assert any(isinstance(m, FewBit) and m.activation.name == "silu"
               for m in optimized.blocks[0].children())
    torch.testing.assert_close(optimized(x), model(x), rtol=0, atol=0)
    got, want = grads(optimized, x), grads(model, x)
    err = max(float((g - w).norm() / w.norm()) for g, w in zip(got, want))
    # few-bit gradients: approximate (so not equal: the rewrite ran in the recomputation
    # too), but close (3-bit SiLU's derivative error is a few percent)
    assert 0 < err < 0.3, err


def test_the_peak_falls_where_a_rewrite_lowers_it_and_rises_at_most_by_the_mask():
    """While backward runs a recomputed region, few-bit keeps codes instead of the ELU's
    input. Inverted keeps the output, which fc2 keeps too, but fc2's backward frees it
    just before the ELU's: the input it spares is live only in that gap, so in this block
    the peak moves rather than drops (ELU is monotone: no mask, so no rise either)."""
    model, x = Checkpointed(act=nn.ELU), x_in(rows=256)  # 256 x 1024 ELU: 1 MiB per tensor
    fewbit = fewbit_fx.report(model, example_inputs=(x,), mode="fewbit", tables="normal")
    exact = fewbit_fx.report(model, example_inputs=(x,), mode="exact")
    assert fewbit.peak_before == exact.peak_before > 2**20
    assert fewbit.peak_after <= fewbit.peak_before - 2**20 // 2, (fewbit.peak_before, fewbit.peak_after)
    assert any(r.variant == "inverted" for r in exact.rows)
    mask_bytes = 256 * W // 8 * 3  # the SiLU gates' masks, one region's worth at most
    assert exact.peak_after <= exact.peak_before + mask_bytes, (exact.peak_before, exact.peak_after)
    assert "measured peak" in str(fewbit)
    assert fewbit.measured_after == fewbit.measured_before
    # the formula GELU's intermediates are gone from the recomputed region
    formula = fewbit_fx.report(Checkpointed(), example_inputs=(x,), mode="exact")
    assert formula.peak_after <= formula.peak_before - 2**20, (formula.peak_before, formula.peak_after)


def test_compiled_backend_keeps_checkpointed_sites_and_saves_what_the_default_saves():
    model, x = Checkpointed(depth=2), x_in()
    backend = fewbit_fx.backend(mode="exact", strict=True)
    saved, results = [], []
    for be in ("inductor", backend):
        torch._dynamo.reset()
        m = copy.deepcopy(model)
        cm = torch.compile(m, backend=be)
        results.append(grads(cm, x))
        saved.append(measure_step(cm, (x,), {}))
    torch._dynamo.reset()
    planned = [p for plan in backend.plans for p in plan]
    assert planned and all(p.site.checkpointed and p.decision.variant == "kept" for p in planned)
    assert all(p.decision.reason == RECOMPUTED for p in planned)
    assert saved[1] <= saved[0]
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_measure_step_runs_reentrant_checkpointing_and_leaves_gradients_as_they_were():
    model, x = Checkpointed(reentrant=True), x_in(requires_grad=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    assert measure_step(model, (x,), {}) > 0
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_without_checkpointing_sites_are_not_marked():
    rep = fewbit_fx.report(Checkpointed(enabled=False), example_inputs=(x_in(),), measure=False)
    assert rep.rows and not any(r.checkpointed for r in rep.rows)
    assert not any("checkpointed" in n for n in rep.notes)
