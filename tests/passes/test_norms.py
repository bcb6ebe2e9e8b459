"""Norm sites (#15 part 3, `norms=True`): LayerNorm / RMSNorm modules whose output a
consumer keeps are swapped for InvertedNorm (backward keeps y and per-row statistics, not
x). Off by default: nothing changes without it."""
from __future__ import annotations

import copy
import io
import pickle

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
    assert abs((before - after) - estimate) <= 0.01 * estimate  # F.rms_norm's x*rstd counted


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


class CastFreeNorm(nn.Module):
    """The aten-op RMSNorm under another name, with `eps` and without dtype casts."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


class CastingNorm(nn.Module):
    """Llama's formula under another name, with `eps`."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class SumNorm(nn.Module):
    """Shaped like one (weight, eps), computes another formula (a sum, not a mean)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.rand(d) + 0.5), eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).sum(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


class WeightlessRMSNorm(nn.Module):
    """Holds a weight of ones that its forward never reads: equal to the formula while the
    weight is ones, so only a probe with another weight tells."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)).to(x.dtype)


@pytest.mark.parametrize("make, kind", [(CastFreeNorm, "uncast_rms_norm"), (CastingNorm, "hf_rms_norm")])
def test_an_rms_norm_is_recognised_by_what_it_computes(make, kind):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        model, x = Block(make(64)).to(dtype), torch.randn(256, 16).to(dtype)
        r = fewbit_fx.report(model, example_inputs=(x,), mode="exact", norms=True)
        (row,) = [row for row in r.rows if row.site == "norm"]
        assert (row.activation, row.variant) == (kind, "inverted")
        optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
        assert isinstance(optimized.norm, InvertedNorm) and optimized.norm.kind == kind
        assert torch.equal(optimized(x), model(x))
        estimate = row.saved_before - row.saved_after
        assert abs((r.measured_before - r.measured_after) - estimate) <= 0.01 * estimate
        if dtype == torch.float32:
            exact = _grads(copy.deepcopy(model).double(), x.double())
            for got, plain, want in zip(_grads(optimized, x), _grads(model, x), exact):
                err, torch_err = ((g.double() - want).norm() / want.norm() for g in (got, plain))
                assert err <= 2 * torch_err + 1e-6, (err, torch_err)


@pytest.mark.parametrize("make", [SumNorm, WeightlessRMSNorm])
def test_a_look_alike_computing_another_formula_stays(make):
    model, x = Block(make(64)), torch.randn(32, 16)
    assert fewbit_fx.nn.norm_kind(model.norm) is None
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
    assert isinstance(optimized.norm, make)
    assert not any(r.site == "norm" for r in fewbit_fx.report(model, example_inputs=(x,), norms=True).rows)


def _tiny_t5(full: bool):
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0)
    model = (T5ForConditionalGeneration if full else T5EncoderModel)(config).train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, **({"decoder_input_ids": ids[:, :8]} if full else {})}
    return model, kwargs


@pytest.mark.parametrize("full", [False, True], ids=["encoder", "encoder_decoder"])
def test_t5_layer_norm_is_inverted(full):
    """T5LayerNorm: no RMSNorm in its name, casts only to half weights (t5_rms_norm)."""
    model, kwargs = _tiny_t5(full)
    r = fewbit_fx.report(model, example_kwargs=kwargs, mode="exact", norms=True)
    norms = [row for row in r.rows if row.activation == "t5_rms_norm"]
    inverted = [row for row in norms if row.variant == "inverted"]
    assert len(inverted) == (10 if full else 4) and len(norms) == (12 if full else 5)
    estimate = sum(row.saved_before - row.saved_after for row in inverted)
    assert abs((r.measured_before - r.measured_after) - estimate) <= 0.01 * estimate
    optimized = fewbit_fx.optimize(copy.deepcopy(model), example_kwargs=kwargs, mode="exact", norms=True)
    assert sum(isinstance(m, InvertedNorm) for m in optimized.modules()) == len(inverted)

    def out(m):
        o = m(**kwargs)
        return o.logits if full else o.last_hidden_state

    assert torch.equal(out(optimized), out(model))
    up = torch.randn(out(model).shape, generator=torch.Generator().manual_seed(2))

    def grads(m):
        m.zero_grad(set_to_none=True)
        (out(m) * up.to(next(m.parameters()).dtype)).sum().backward()
        return [p.grad for p in m.parameters()]

    exact = grads(copy.deepcopy(model).double())
    for got, plain, want in zip(grads(optimized), grads(model), exact):
        if want is None:
            continue
        err, torch_err = ((g.double() - want).norm() / want.norm() for g in (got, plain))
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    copied = pickle.loads(pickle.dumps(optimized))
    assert torch.equal(out(copied), out(model))


def test_t5_layer_norm_in_bf16_and_mixed_dtypes():
    """The T5 kind reproduces T5LayerNorm where it differs from Llama's formula: half x
    with fp32 weights (fp32 out) and fp32 x with half weights (half out)."""
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for wdtype, xdtype in ((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                           (torch.bfloat16, torch.bfloat16)):
        norm = T5LayerNorm(64).to(wdtype)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
        model = Block(norm).to(wdtype)
        model.up.to(xdtype)
        x = torch.randn(64, 16).to(xdtype)
        optimized = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="exact", norms=True)
        assert isinstance(optimized.norm, InvertedNorm) and optimized.norm.kind == "t5_rms_norm"
        xr = x.clone().requires_grad_(True)
        y, want = optimized.norm(optimized.up(xr)), model.norm(model.up(x))
        assert y.dtype == want.dtype and torch.equal(y, want)


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


# --- the compiler's graph (the "fewbit" backend with norms=True) ----------------------------

def _dynamo_graphs(model, x):
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=record, fullgraph=True)(x)
    torch._dynamo.reset()
    return graphs


class FunctionalLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.w, self.b, self.down = nn.Linear(16, 64), nn.Parameter(torch.rand(64)), \
            nn.Parameter(torch.zeros(64)), nn.Linear(64, 8)

    def forward(self, x):
        return self.down(torch.nn.functional.layer_norm(self.up(x), (64,), self.w, self.b, 1e-5))


@pytest.mark.parametrize("make, dtype, kind, name", [
    (lambda: Block(nn.LayerNorm(64)), torch.float32, "layer_norm", "norm"),
    (lambda: Block(nn.RMSNorm(64)), torch.float32, "rms_norm", "norm"),
    (lambda: Block(HFStyleRMSNorm(64)), torch.float32, "hf_rms_norm", "norm"),
    (lambda: Block(HFStyleRMSNorm(64)).bfloat16(), torch.bfloat16, "hf_rms_norm", "norm"),
    (lambda: Block(CastFreeNorm(64)).bfloat16(), torch.bfloat16, "uncast_rms_norm", "norm"),
    (lambda: FunctionalLN(), torch.float32, "layer_norm", "<root>:layer_norm#0"),
], ids=["LayerNorm", "RMSNorm", "LlamaRMSNorm", "LlamaRMSNorm-bf16", "cast-free-bf16", "F.layer_norm"])
def test_compiled_graph_norms_are_found_by_call_or_by_what_they_compute(make, dtype, kind, name):
    from fewbit_fx.passes.norms import find_compiled_norm_sites

    torch.manual_seed(0)
    (site,) = find_compiled_norm_sites(_dynamo_graphs(make(), torch.randn(8, 16, dtype=dtype)))
    assert (site.activation.name, site.name) == (kind, name)
    assert site.activation.operands.normalized_shape == (64,)


@pytest.mark.parametrize("norm", [LookAlikeRMSNorm(64), nn.Identity()], ids=["gemma-1+w", "identity"])
def test_compiled_graph_look_alikes_are_not_norm_sites(norm):
    from fewbit_fx.passes.norms import find_compiled_norm_sites

    assert find_compiled_norm_sites(_dynamo_graphs(Block(norm), torch.randn(8, 16))) == []
