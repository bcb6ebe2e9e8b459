"""optimize() on the user's real training stack (issue: sites by identity, rewrites that
behave like the original on every call path, no side effects): PEFT, the HF Trainer,
generate() (also in lazy mode), decorated forwards, graph breaks, gradient checkpointing,
persistence (torch.save in a fresh process, deepcopy, state_dict both ways), hooks,
trainability changes, and the user's own torch.compile after many analyses.
(DDP, FSDP2 and accelerate: tests/test_distributed.py.)"""
from __future__ import annotations

import copy
import functools
import io
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from fewbit_fx.measure import scalar_loss
from fewbit_fx.nn import FewBit, Inverted

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 96


def tiny_gpt2(**kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return transformers.GPT2LMHeadModel(cfg).train()


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                   num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).train()


def ids(batch=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def decisions(model, mode="auto", **inputs) -> dict[str, str]:
    """site -> variant, with wrapper prefixes (PEFT's base_model.model.) removed; with no
    inputs, what optimize() did."""
    if inputs:
        rows = fewbit_fx.report(model, example_kwargs=inputs, mode=mode, measure=False).rows
    else:
        rows = fewbit_fx.report(model).rows
    return {r.site.removeprefix("base_model.model."): r.variant for r in rows}


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, **inputs):
    model.zero_grad(set_to_none=True)
    loss = scalar_loss(model(**inputs))
    loss.backward()
    return loss.detach(), grads(model)


def assert_grads_close(a, b, rel=1e-5):
    assert a.keys() == b.keys()
    scale = max(g.abs().max().item() for g in b.values())
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= rel * scale, f"max gradient error {worst:.3g} (max |grad| {scale:.3g})"


def lora(model, targets):
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      lora_dropout=0.0))


# --- sites found by identity, whatever wraps or decorates the model -------------------------

@pytest.mark.parametrize("build,targets", [(tiny_gpt2, ["c_attn"]), (tiny_llama, ["q_proj", "v_proj"])],
                         ids=["gpt2", "llama"])
def test_peft_before_and_after_optimize(build, targets):
    x = ids()
    bare = decisions(lora(build(), targets), input_ids=x)
    assert bare and set(bare.values()) <= {"inverted", "fewbit-3", "kept"}

    after = lora(build(), targets)  # optimize a PeftModel (custom __getattr__, decorated forward)
    reference = copy.deepcopy(after)
    fewbit_fx.optimize(after, example_kwargs={"input_ids": x}, mode="exact")
    assert decisions(after) == decisions(reference, "exact", input_ids=x)
    assert set(decisions(after).values()) == {"inverted"}
    assert torch.equal(after(input_ids=x).logits, reference(input_ids=x).logits)
    la, ga = loss_and_grads(after, input_ids=x)
    lr, gr = loss_and_grads(reference, input_ids=x)
    assert torch.equal(la, lr)
    assert_grads_close(ga, gr)

    before = build()  # optimize, then add adapters: the decisions are stale, and say so
    fewbit_fx.optimize(before, example_kwargs={"input_ids": x})
    wrapped = lora(before, targets)
    with pytest.warns(RuntimeWarning, match="requires_grad changed"):
        scalar_loss(wrapped(input_ids=x)).backward()
    assert any("stale" in n for n in fewbit_fx.report(before).notes)
    fewbit_fx.optimize(wrapped, example_kwargs={"input_ids": x})  # re-decided for LoRA
    assert decisions(wrapped) == bare


def test_decorated_forward_with_star_args_is_found():
    """transformers 5.24 wraps LlamaForCausalLM.forward in a *args decorator: Dynamo names
    the root L['args'][0]; sites must still be found and rewritten."""
    model = tiny_llama()
    x = ids()
    expected = model(input_ids=x).logits
    fewbit_fx.optimize(model, example_kwargs={"input_ids": x})
    rows = fewbit_fx.report(model).rows
    assert [r.site for r in rows] == [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    assert all(isinstance(model.model.layers[i].mlp.act_fn, (Inverted, FewBit)) for i in range(2))
    assert torch.equal(model(input_ids=x).logits, expected)


class Breaking(nn.Module):
    """A graph break inside a submodule: Dynamo resumes in the submodule's own frame."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x):
        h = self.up(x)
        print("", end="")  # graph break
        return self.down(F.gelu(h))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Breaking(), Breaking()
        self.act = nn.SiLU()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        x = self.act(x) * x
        return self.second(x)


def test_graph_breaks_anywhere_give_sites_by_identity():
    """Breaks in the root and inside submodules: Dynamo resumes in the submodule's frame,
    whose nodes must still be named from the model's root."""
    model = Outer()
    x = torch.randn(4, 16)
    expected = model(x)
    rep = fewbit_fx.report(model, example_inputs=(x,), measure=False)
    # `second` is another instance of the same class, whose frames Dynamo answers from the
    # first one's cache: not seen, left as it is, and the report says so
    assert sorted(r.site for r in rep.rows) == ["act", "first:gelu#0"]
    assert any("ran more than once" in n for n in rep.notes)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert isinstance(model.first.fewbit_gelu_0, Inverted)
    assert not hasattr(model.second, "fewbit_gelu_0")
    assert torch.equal(model(x), expected)


def test_a_graph_reused_for_several_instances_is_reported():
    class Repeated(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(Breaking(), Breaking())

        def forward(self, x):
            return self.blocks(x)

    rep = fewbit_fx.report(Repeated(), example_inputs=(torch.randn(4, 16),), measure=False)
    assert [r.site for r in rep.rows] == ["blocks.0:gelu#0"]
    assert any("ran more than once" in n and "Fix" in n for n in rep.notes)


def test_gpt2_gradient_checkpointing_with_cache_graph_break():
    model = tiny_gpt2()
    model.gradient_checkpointing_enable()
    x = ids()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fewbit_fx.optimize(model, example_kwargs={"input_ids": x, "use_cache": True}, mode="exact")
        assert [r.variant for r in fewbit_fx.report(model).rows] == ["inverted", "inverted"]
        la, ga = loss_and_grads(model, input_ids=x)
        lr, gr = loss_and_grads(reference, input_ids=x)
    assert torch.equal(la, lr)
    assert_grads_close(ga, gr)


# --- functional sites behave like the original on every call path ------------------------

class Optional(nn.Module):
    """The issue's reproducer: an optional argument, dropout that follows train/eval."""

    def __init__(s):
        super().__init__()
        s.a = nn.Linear(16, 64)
        s.b = nn.Linear(64, 16)

    def forward(s, x, scale=None):
        h = F.dropout(F.gelu(s.a(x)), 0.5, training=s.training)
        if scale is not None:
            h = h * scale
        return s.b(h)


class KeywordOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 64), nn.Linear(64, 16)

    def forward(self, x, *, gate: bool = True, approximate="none"):
        h = self.a(x)
        h = F.gelu(h, approximate=approximate) if gate else torch.tanh(h)
        if h.mean() > 10:  # data-dependent, never taken here
            h = h.sigmoid()
        return self.b(h)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("scale", [None, 2.0])
def test_reproducer_optional_argument_and_train_eval(train, scale):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    ref = Optional().train()
    model = copy.deepcopy(ref)
    fewbit_fx.optimize(model, example_inputs=(x,))  # analysed in train mode, without scale
    ref.train(train)
    model.train(train)
    torch.manual_seed(1)
    expected = ref(x, scale=scale)
    torch.manual_seed(1)
    assert torch.equal(model(x, scale=scale), expected)
    assert isinstance(model.fewbit_gelu_0, (FewBit, Inverted))


def test_keyword_only_arguments_and_other_branches():
    x = torch.randn(4, 16)
    ref = KeywordOnly()
    model = copy.deepcopy(ref)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    for kwargs in ({}, {"gate": False}, {"approximate": "tanh"}, {"gate": True, "approximate": "none"}):
        xr, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, ym = ref(xr, **kwargs), model(xm, **kwargs)
        assert torch.equal(yr, ym), kwargs
        yr.square().sum().backward()
        ym.square().sum().backward()
        torch.testing.assert_close(xm.grad, xr.grad, rtol=1e-5, atol=1e-6)
    # a planned call with other parameters at run time runs as written (no rewrite):
    calls = []
    model.fewbit_gelu_0.register_forward_hook(lambda *a: calls.append(1))
    model(x, approximate="tanh")
    assert calls == []
    model(x)
    assert calls == [1]


# --- generate(), lazy mode, caches ---------------------------------------------------------

@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_generate_equal_also_in_lazy_mode(build):
    prompt = ids(batch=1, seq=6)
    ref = build().eval()
    expected = ref.generate(prompt, max_new_tokens=6, do_sample=False)
    eager = fewbit_fx.optimize(build().eval(), example_kwargs={"input_ids": prompt})
    assert torch.equal(eager.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    lazy = fewbit_fx.optimize(build().eval())  # analysed on generate()'s first forward
    assert torch.equal(lazy.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    assert fewbit_fx.report(lazy).rows


def test_lazy_first_call_advances_a_cache_once():
    prompt = ids(batch=1, seq=5)
    ref, lazy = tiny_llama().eval(), fewbit_fx.optimize(tiny_llama().eval())
    cache_ref, cache_lazy = transformers.DynamicCache(), transformers.DynamicCache()
    a = ref(input_ids=prompt, past_key_values=cache_ref, use_cache=True)
    b = lazy(input_ids=prompt, past_key_values=cache_lazy, use_cache=True)
    assert torch.equal(a.logits, b.logits)
    assert cache_lazy.get_seq_length() == cache_ref.get_seq_length() == 5


def test_lazy_mode_deepcopy_before_first_call_optimizes_the_copy():
    x = torch.randn(4, 16)
    model = fewbit_fx.optimize(Optional())
    twin = copy.deepcopy(model)
    twin(x)
    assert hasattr(twin, "fewbit_gelu_0") and not hasattr(model, "fewbit_gelu_0")
    model(x)
    assert hasattr(model, "fewbit_gelu_0")


# --- persistence -----------------------------------------------------------------------------

@pytest.mark.slow
def test_torch_save_round_trip_in_a_fresh_process(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    model = fewbit_fx.optimize(Optional().eval(), example_inputs=(x,), mode="exact")
    path = tmp_path / "model.pt"
    torch.save({"model": model, "x": x, "y": model(x)}, path)
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        import fewbit_fx
        from fewbit_fx.nn import Inverted
        saved = torch.load({str(path)!r}, weights_only=False)
        m, x = saved["model"], saved["x"]
        assert isinstance(m.fewbit_gelu_0, Inverted), m
        assert type(m.__dict__["forward"]).__name__ == "_Rewritten"
        calls = []
        m.fewbit_gelu_0.register_forward_hook(lambda *a: calls.append(1))
        assert torch.equal(m(x), saved["y"])
        assert calls == [1], "the reloaded forward does not run the rewritten call"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_deepcopy_and_state_dict_both_ways():
    x = torch.randn(4, 16)
    plain = Optional().eval()
    model = fewbit_fx.optimize(copy.deepcopy(plain), example_inputs=(x,), mode="exact")
    twin = copy.deepcopy(model)
    calls = []
    twin.fewbit_gelu_0.register_forward_hook(lambda *a: calls.append(1))
    assert torch.equal(twin(x), plain(x)) and calls == [1]
    assert twin.__dict__["forward"].owner is twin
    other = Optional().eval()
    model.load_state_dict(other.state_dict(), strict=True)  # plain -> optimized
    assert torch.equal(model(x), other(x))
    fresh = Optional().eval()
    fresh.load_state_dict(model.state_dict(), strict=True)  # optimized -> plain
    assert torch.equal(fresh(x), other(x))


# --- hooks -----------------------------------------------------------------------------------

class HookedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def test_user_forward_hooks_keep_working_through_their_handles():
    model = HookedMLP()
    seen = []
    handles = [
        model.act.register_forward_pre_hook(lambda m, a: seen.append("pre")),
        model.act.register_forward_hook(lambda m, a, y: seen.append("fwd")),
        model.act.register_forward_hook(lambda m, a, k, y: seen.append("fwd-kw"), with_kwargs=True),
    ]
    x = torch.randn(4, 8)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    assert isinstance(model.act, Inverted)
    seen.clear()
    model(x).sum().backward()
    assert seen == ["pre", "fwd", "fwd-kw"]
    later = model.act.register_forward_hook(lambda m, a, y: seen.append("later"))
    for h in handles:
        h.remove()
    seen.clear()
    model(x).sum().backward()
    assert seen == ["later"]
    later.remove()


def test_module_with_backward_hooks_is_kept_and_its_hooks_still_fire():
    """Dynamo does not trace a module with full backward hooks as a module call, so the
    site is not recognised as that module: it stays as it is, hooks and all."""
    model = HookedMLP()
    seen = []
    model.act.register_full_backward_pre_hook(lambda m, g: seen.append("bwd-pre"))
    model.act.register_full_backward_hook(lambda m, gi, go: seen.append("bwd"))
    x = torch.randn(4, 8)
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    assert type(model.act) is nn.GELU
    rep = fewbit_fx.report(model)
    assert all(r.variant == "kept" for r in rep.rows)
    assert any(n.startswith("not seen by the analysis: act:") for n in rep.notes)
    seen.clear()
    y = model(x)
    y.sum().backward()
    assert torch.equal(y, expected) and seen == ["bwd-pre", "bwd"]


# --- no side effects -------------------------------------------------------------------------

def users_compile(x):
    """The user's own torch.compile of a model, and the graphs it compiled so far."""
    graphs = []

    def counting(gm, ex):
        graphs.append(gm)
        return gm.forward

    user = torch.compile(Optional().eval(), backend=counting)
    user(x)
    return user, graphs


def test_users_compile_works_after_many_analyses():
    import torch._dynamo.eval_frame as ef

    x = torch.randn(4, 16)
    for _ in range(25):
        fewbit_fx.report(Optional(), example_inputs=(x,), measure=False)
        fewbit_fx.optimize(Optional(), example_inputs=(x,))
    assert len(ef._debug_get_cache_entry_list(Optional.forward)) == 0  # nothing left behind
    _, graphs = users_compile(x)
    assert graphs, "the user's compile ran eagerly"


def test_analysis_keeps_the_users_compiled_code_and_settings():
    x = torch.randn(4, 16)
    user, graphs = users_compile(x)
    n, threads = len(graphs), torch.get_num_threads()
    fewbit_fx.report(Optional(), example_inputs=(x,), compiled=True)
    fewbit_fx.optimize(Optional(), example_inputs=(x,), mode="fewbit")
    user(x)
    assert len(graphs) == n, "the user's compiled code was dropped and recompiled"
    assert torch.get_num_threads() == threads


# --- decisions follow trainability -----------------------------------------------------------

def test_unfreezing_a_consumer_warns_once_and_report_says_stale():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)
            self.down.requires_grad_(False)

        def forward(self, x):
            return self.down(F.gelu(self.up(x)))

    x = torch.randn(64, 8)
    model = fewbit_fx.optimize(Frozen(), example_inputs=(x,))
    assert fewbit_fx.report(model).rows[0].variant.startswith("fewbit")
    model.down.requires_grad_(True)
    with pytest.warns(RuntimeWarning, match="optimize"):
        model(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x).sum().backward()  # once only
    assert "stale" in fewbit_fx.report(model).notes[0]
    fewbit_fx.optimize(model, example_inputs=(x,))  # re-decided: inverted now
    assert fewbit_fx.report(model).rows[0].variant == "inverted"
    assert not any("stale" in n for n in fewbit_fx.report(model).notes)


def test_report_on_an_optimized_model_says_so():
    x = torch.randn(4, 16)
    model = fewbit_fx.optimize(Optional(), example_inputs=(x,))
    rep = fewbit_fx.report(model, example_inputs=(x,), measure=False)
    assert rep.rows and "already optimized" in rep.notes[0]
    assert hasattr(model, "fewbit_gelu_0")  # untouched by the dry run


# --- the HF Trainer ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_trainer_runs_a_few_steps(tmp_path, compiled):
    from transformers import Trainer, TrainingArguments

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            t = ids(batch=1, seq=12, seed=i)[0]
            return {"input_ids": t, "labels": t}

    model = fewbit_fx.optimize(tiny_gpt2(), example_kwargs={"input_ids": ids()})
    if compiled:
        model.compile(backend="fewbit")
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                             dataloader_num_workers=0, learning_rate=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = Trainer(model=model, args=args, train_dataset=Data()).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    assert isinstance(model.transformer.h[0].mlp.act, Inverted)
