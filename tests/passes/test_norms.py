"""Norm sites (#15 part 3, `norms=True`): LayerNorm / RMSNorm modules whose output a
consumer keeps are swapped for InvertedNorm (backward keeps y and per-row statistics, not
x). Off by default: nothing changes without it."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fewbit_fx
from fewbit_fx.evidence import models
from _training import grads as _grads
from fewbit_fx.measure import measure_step
from fewbit_fx.nn import InvertedNorm


class Block(nn.Module):
    def __init__(self, norm: nn.Module, d: int = 64):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(16, d), norm, nn.Linear(d, 8)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def HFStyleRMSNorm(d):
    """Hugging Face's own RMSNorm class (Llama's modeling file), weights off 1."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(d)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    return norm


class LookAlikeRMSNorm(nn.Module):
    """Named and shaped like one, computes something else (Gemma's 1 + weight)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, hidden_states):
        h = hidden_states.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h.to(hidden_states.dtype)


def _ln():
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.2, 0.2)
    return ln


NORMS = {"layer_norm": _ln, "rms_norm": lambda: nn.RMSNorm(64), "hf_rms_norm": lambda: HFStyleRMSNorm(64)}


@pytest.mark.parametrize("kind", list(NORMS))
def test_a_norm_before_a_linear_is_inverted_exactly(kind):
    torch.manual_seed(0)
    model, x = Block(NORMS[kind]()), torch.randn(256, 16)
    reference = copy.deepcopy(model)
    r = fewbit_fx.report(model, example_inputs=(x,), mode="exact", norms=True)
    (row,) = [row for row in r.rows if row.site == "norm"]
    assert row.activation == kind and row.variant == "inverted" and "down" in row.reason
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    assert isinstance(optimized.norm, InvertedNorm)
    assert optimized.norm.weight is not reference.norm.weight  # a copy's own parameters...
    assert list(optimized.state_dict()) == list(reference.state_dict())  # ...under the same keys
    assert torch.equal(optimized(x), reference(x))
    # against float64: no further from it than torch's own fp32 backward (2x, + 1e-6)
    exact = _grads(copy.deepcopy(reference).double(), x.double())
    for got, plain, want in zip(_grads(optimized, x), _grads(reference, x), exact):
        err, torch_err = ((g.double() - want).norm() / want.norm() for g in (got, plain))
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    before, after = measure_step(reference, (x,), {}), measure_step(optimized, (x,), {})
    estimate = row.saved_before - row.saved_after
    assert before - after >= 0.99 * estimate > 0  # the step saves at least the estimate
    if kind != "rms_norm":  # F.rms_norm keeps more than its input (its intermediates)
        assert abs((before - after) - estimate) <= 0.01 * estimate


def test_a_norm_whose_output_nobody_keeps_stays():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.norm = nn.Linear(16, 64), nn.LayerNorm(64)

        def forward(self, x):
            h = self.up(x)
            return (h + self.norm(h)).sum(-1)

    r = fewbit_fx.report(Residual(), example_inputs=(torch.randn(8, 16),), mode="exact", norms=True)
    (row,) = r.rows
    assert row.variant == "kept" and "no consumer keeps its output" in row.reason


def test_a_look_alike_rms_norm_is_left_alone():
    model, x = Block(LookAlikeRMSNorm(64)), torch.randn(32, 16)
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    assert isinstance(optimized.norm, LookAlikeRMSNorm)
    assert not any(r.site == "norm" for r in fewbit_fx.report(model, example_inputs=(x,), norms=True).rows)


def test_persistence_and_re_deciding():
    model, x = Block(_ln()), torch.randn(32, 16)
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    buf = io.BytesIO()
    torch.save(optimized, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded.norm, InvertedNorm) and torch.equal(loaded(x), model(x))
    assert isinstance(copy.deepcopy(optimized).norm, InvertedNorm)
    optimized.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(optimized.state_dict(), strict=True)
    again = fewbit_fx.optimize(optimized, example_inputs=(x,), mode="exact")
    assert isinstance(again.norm, nn.LayerNorm)  # undone and decided afresh: norms are opt-in


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_real_models_forward_unchanged_and_gradients_exact(name):
    model, args, kwargs = models.build(name, "tiny")
    reference = copy.deepcopy(model)
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=args, example_kwargs=kwargs,
                                   mode="exact", norms=True)
    assert any(isinstance(m, InvertedNorm) for m in optimized.modules())
    out, want = optimized(*args, **kwargs), reference(*args, **kwargs)
    logits = out.logits if hasattr(out, "logits") else out
    ref_logits = want.logits if hasattr(want, "logits") else want
    assert torch.equal(logits, ref_logits)
    for m in (optimized, reference):
        m.zero_grad(set_to_none=True)
    (logits.float().pow(2).mean()).backward()
    (ref_logits.float().pow(2).mean()).backward()
    for (n, p), q in zip(optimized.named_parameters(), reference.parameters()):
        if q.grad is not None:
            err = float((p.grad - q.grad).norm() / max(float(q.grad.norm()), 1e-30))
            assert err < 1e-4, (n, err)
    assert measure_step(optimized, args, kwargs) < measure_step(reference, args, kwargs)


def test_norms_are_opt_in_and_checked():
    model, x = Block(_ln()), torch.randn(32, 16)
    assert not any(r.site == "norm" for r in fewbit_fx.report(model, example_inputs=(x,)).rows)
    assert isinstance(fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,)).norm, nn.LayerNorm)
    with pytest.raises(TypeError, match="norms must be True or False"):
        fewbit_fx.optimize(model, example_inputs=(x,), norms="yes")
