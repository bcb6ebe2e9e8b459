"""The "fewbit" torch.compile backend on CPU (Inductor's C++ backend)."""
import importlib.metadata

import pytest
import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import fewbit_fx
from fewbit_fx.measure import saved_bytes


class MLP(nn.Module):
    def __init__(self, act, d=64, h=256, frozen_out=False):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(d, h), act, nn.Linear(h, d)
        self.down.requires_grad_(not frozen_out)

    def forward(self, x):
        return self.down(self.act(self.up(x))) + x


def step(model, x):
    """Saved storages of one compiled training step, parameters excluded."""
    rec = saved_bytes(lambda: model(x).square().mean(), exclude=list(model.parameters()))
    rec.loss.backward()
    return rec


def compiled(model, backend):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


def test_backend_name_resolves_and_entry_point_is_declared():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("fewbit") is fewbit_fx.backend.__globals__["fewbit_backend"]
    names = {ep.name for ep in importlib.metadata.entry_points(group="torch_dynamo_backends")}
    assert "fewbit" in names


def test_exact_mode_drops_the_preactivation_and_matches_default_gradients():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = MLP(nn.GELU())
    default = step(compiled(model, "inductor"), x)
    grads_default = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    be = fewbit_fx.backend(mode="exact", strict=True)
    ours = step(compiled(model, be), x)
    n = 32 * 256
    # default keeps x, the pre-activation and y; exact keeps x, y and a 1-bit mask
    # (both also keep the output, which the loss's square() saves)
    io = 32 * 64 * 4
    assert sorted(default.storages.values()) == [io, io, n * 4, n * 4]
    assert sorted(ours.storages.values()) == [n // 8, io, io, n * 4]
    assert [p.decision.label for plan in be.plans for p in plan] == ["inverted"]
    for p, g in zip(model.parameters(), grads_default):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


def test_fewbit_kernels_are_fused_not_extern_calls():
    x = torch.randn(16, 64)
    model = MLP(nn.SiLU(), frozen_out=True)
    cm = compiled(model, fewbit_fx.backend(mode="fewbit", bits=3, strict=True))
    _, codes = run_and_get_code(lambda: cm(x).sum().backward())
    calls = [line for c in codes for line in c.splitlines() if not line.lstrip().startswith("#")]
    assert not [c for c in calls if "torch.ops.fewbit_fx" in c], "custom op was not decomposed"
    assert not [c for c in calls if "torch.ops.aten.bucketize" in c], "extern call breaks fusion"
    kernels = [c for c in calls if "cpp_fused" in c and "(" in c and "async_compile" not in c]
    assert any("fewbit_forward" in k for k in kernels), kernels
    assert any("fewbit_backward" in k for k in kernels), kernels


def test_no_grad_eval_changes_nothing():
    x = torch.randn(8, 64)
    model = MLP(nn.GELU()).eval()
    be = fewbit_fx.backend(strict=True)
    with torch.no_grad():
        out = compiled(model, be)(x)
    assert all(p.decision.variant == "kept" for plan in be.plans for p in plan)
    torch.testing.assert_close(out, model(x))


def test_graph_breaks_dynamic_shapes_and_optimizer_steps():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = MLP(nn.GELU()), MLP(nn.SiLU())

        def forward(self, x):
            h = self.a(x)
            torch._dynamo.graph_break()
            return self.b(h)

    torch.manual_seed(0)
    model = Broken()
    be = fewbit_fx.backend(mode="exact", strict=True)
    torch._dynamo.reset()
    cm = torch.compile(model, backend=be, dynamic=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(8, 64)
    losses = []
    for batch in (8, 5, 8, 5):
        opt.zero_grad()
        loss = cm(x[:batch]).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    labels = [p.decision.label for plan in be.plans for p in plan]
    assert labels.count("inverted") >= 2  # one site in each graph
    reference = Broken()
    reference.load_state_dict(model.state_dict())
    torch.testing.assert_close(cm(x), reference(x), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0]


def test_warm_inductor_cache_still_applies_the_rewrite():
    from torch._dynamo.utils import counters

    x = torch.randn(16, 64)
    model = MLP(nn.GELU())
    first = step(compiled(model, fewbit_fx.backend(mode="exact", strict=True)), x).bytes
    hits = counters["inductor"]["fxgraph_cache_hit"]
    second = step(compiled(model, fewbit_fx.backend(mode="exact", strict=True)), x).bytes
    assert counters["inductor"]["fxgraph_cache_hit"] > hits, "the second compile was not a cache hit"
    default = step(compiled(model, "inductor"), x).bytes
    assert first == second < default


def test_bad_backend_arguments():
    with pytest.raises(ValueError, match="mode"):
        fewbit_fx.backend(mode="fast")
    with pytest.raises(ValueError, match="bits"):
        fewbit_fx.backend(bits=9)
    for bad in (1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(ValueError, match="memory_budget"):
            fewbit_fx.backend(memory_budget=bad)


def test_bf16_autocast_saves_less_and_keeps_gradients_close():
    torch.manual_seed(0)
    x = torch.randn(16, 64)
    model = MLP(nn.SiLU())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        default = step(compiled(model, "inductor"), x)
        grads_default = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        be = fewbit_fx.backend(mode="exact", strict=True)
        ours = step(compiled(model, be), x)
    assert [p.decision.label for plan in be.plans for p in plan] == ["inverted"]
    assert ours.bytes < default.bytes
    for p, g in zip(model.parameters(), grads_default):
        torch.testing.assert_close(p.grad, g, rtol=0.05, atol=2e-3)


def test_compiled_report_reads_per_site_bytes_from_the_partitioned_graphs():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = MLP(nn.GELU())
    rep = fewbit_fx.report(model, example_inputs=(x,), mode="exact", compiled=True)
    (row,) = rep.rows
    n = 32 * 256
    assert row.variant == "inverted"
    assert row.saved_before == 2 * n * 4        # default: pre-activation and y
    assert row.saved_after == n * 4 + n // 8    # fewbit: y and a 1-bit mask
    assert rep.measured_after == rep.measured_before - (row.saved_before - row.saved_after)
    assert all(p.grad is None for p in model.parameters())  # the model itself was not run


def test_compiled_report_names_activation_like_modules_it_does_not_rewrite():
    model = nn.Sequential(nn.Linear(8, 16), nn.PReLU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 2))
    rep = fewbit_fx.report(model, example_inputs=(torch.randn(4, 8),), compiled=True)
    assert [r.site for r in rep.rows] == ["3"]
    assert any(n.startswith("not rewritten: PReLU at 1:") for n in rep.notes)


class GatedMLP(nn.Module):
    def __init__(self, act, d=64, h=256):
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d), act

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


@pytest.mark.parametrize("mode", ["auto", "fewbit"])
def test_gated_mlp_is_left_alone_and_its_product_is_recomputed(mode):
    """The partitioner recomputes silu(gate) for the mul from gate's output, which it saves:
    no rewrite of the SiLU can save less, so it is kept. At budget 1 the partitioner also
    saves the product for down's weight gradient, which the backend has it recompute from
    gate and up instead (tests/test_gated_mlp.py): one tensor of the MLP's width less."""
    x = torch.randn(32, 64)
    model = GatedMLP(nn.SiLU())
    default = step(compiled(model, "inductor"), x)
    be = fewbit_fx.backend(mode=mode, strict=True)
    ours = step(compiled(model, be), x)
    assert [p.decision.variant for plan in be.plans for p in plan] == ["kept"]
    kept = sorted(default.storages.values())
    kept.remove(32 * 256 * 4)  # the product silu(gate) * up
    assert sorted(ours.storages.values()) == kept


class NormThenAct(nn.Module):
    """conv-BatchNorm-act-conv (CNNs) or linear-LayerNorm-act-linear."""

    def __init__(self, act, conv: bool):
        super().__init__()
        if conv:
            self.a, self.norm, self.b = nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.Conv2d(16, 4, 1)
        else:
            self.a, self.norm, self.b = nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 8)
        self.act = act

    def forward(self, x):
        return self.b(self.act(self.norm(self.a(x))))


@pytest.mark.parametrize("conv, act", [(True, nn.SiLU()), (True, nn.ReLU6()), (False, nn.GELU())])
def test_activation_after_a_norm_is_left_alone_and_saves_what_the_default_saves(conv, act):
    """The partitioner recomputes a norm's output from the norm's input, which it keeps: the
    activation's input costs nothing under the compiler, so a rewrite could only add."""
    model = NormThenAct(act, conv)
    x = torch.randn(2, 4, 8, 8) if conv else torch.randn(16, 8)
    default = step(compiled(model, "inductor"), x)
    be = fewbit_fx.backend(mode="exact", strict=True)
    ours = step(compiled(model, be), x)
    [[site]] = be.plans
    assert site.decision.variant == "kept" and "norm" in site.decision.reason
    assert sorted(ours.storages.values()) == sorted(default.storages.values())
    # eager autograd keeps the norm's output for the activation, so optimize() rewrites it
    eager = fewbit_fx.report(model, example_inputs=(x,), mode="exact", measure=False)
    assert [r.variant for r in eager.rows] == ["inverted"]


class Chained(nn.Module):
    """One rewritten activation feeding another (issue 18, item 7)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(8, 8)

    def forward(self, x):
        y = torch.nn.functional.tanhshrink(self.l1(x))
        return torch.sigmoid(y).sum() + y.sum()


def test_a_rewritten_activation_feeding_another_compiles():
    import copy

    torch.manual_seed(0)
    model, x = Chained(), torch.randn(4, 8)
    eager = fewbit_fx.optimize(copy.deepcopy(model), example_inputs=(x,), mode="fewbit", tables="normal")
    expected = eager(x)
    expected.backward()
    be = fewbit_fx.backend(mode="fewbit", strict=True)
    out = compiled(model, be)(x)
    out.backward()
    assert sum(p.decision.variant != "kept" for plan in be.plans for p in plan) == 2
    torch.testing.assert_close(out, expected)
    for p, q in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_a_failing_rewrite_falls_back_to_the_untouched_graph(monkeypatch):
    import sys

    backend_module = sys.modules["fewbit_fx.compile_backend"]
    real = backend_module.rewrite_graph

    def broken(gm, planned):
        real(gm, planned)  # mutate the graph, then fail
        raise RuntimeError("injected failure")

    monkeypatch.setattr(backend_module, "rewrite_graph", broken)
    torch.manual_seed(0)
    model, x = MLP(nn.GELU()), torch.randn(4, 64)
    expected = model(x)
    with pytest.warns(RuntimeWarning, match="injected failure"):
        out = compiled(model, fewbit_fx.backend(mode="exact"))(x)
    torch.testing.assert_close(out, expected)


class Stack(nn.Module):
    """Two residual MLP blocks; the second's down projection optionally frozen (an adapter
    fine-tuning pattern: nothing keeps that GELU's output, so auto mode picks few-bit)."""

    def __init__(self, frozen: bool):
        super().__init__()
        self.blocks = nn.Sequential(MLP(nn.GELU()), MLP(nn.GELU(), frozen_out=frozen))

    def forward(self, x):
        return self.blocks(x)


def _budget_alone(budget):
    from torch._inductor.compile_fx import compile_fx

    def inductor(gm, example_inputs):
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(gm, example_inputs)
    return inductor


@pytest.mark.parametrize("frozen", [False, True])
def test_memory_budget_composes_and_never_saves_more_than_the_budget_alone(frozen):
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = Stack(frozen)
    before = torch._functorch.config.activation_memory_budget
    for budget in (1.0, 0.5):
        alone = step(compiled(model, _budget_alone(budget)), x).bytes
        want = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        be = fewbit_fx.backend(mode="auto", memory_budget=budget, strict=True)
        ours = step(compiled(model, be), x).bytes
        got = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        model.zero_grad()
        assert torch._functorch.config.activation_memory_budget == before  # no trace left
        assert ours <= alone, (budget, ours, alone)
        if frozen:  # recompute needs the frozen site's x; few-bit keeps 3 bits of it
            assert ours < alone, (budget, ours, alone)
        labels = [p.decision.label for plan in be.plans for p in plan]
        assert any(label.startswith("fewbit") for label in labels) == frozen, labels
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0.05, atol=2e-3)


def test_where_the_rewrite_saves_nothing_under_a_budget_the_original_is_compiled():
    # b = 0: both plans recompute everything from the block inputs, so the rewritten graph
    # keeps exactly what the original keeps; its extra backward work would buy nothing.
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = Stack(frozen=False)
    alone = step(compiled(model, _budget_alone(0.0)), x).bytes
    be = fewbit_fx.backend(mode="auto", memory_budget=0.0, strict=True)
    assert step(compiled(model, be), x).bytes == alone
    assert be.plans == [[]] and len(be.notes) == 1, (be.plans, be.notes)
    assert "no saving for the rewrite's extra work" in be.notes[0]


def test_the_plain_backend_follows_the_users_global_budget():
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    model = Stack(frozen=False)
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        plain = step(compiled(model, "fewbit"), x).bytes
    configured = step(compiled(model, fewbit_fx.backend(memory_budget=0.5)), x).bytes
    default = step(compiled(model, "fewbit"), x).bytes
    assert plain == configured < default


# --- norms=True: LayerNorm / RMSNorm calls found in the compiler's graph ---------------------

class NormBlock(nn.Module):
    def __init__(self, norm, d=64):
        super().__init__()
        self.up, self.norm, self.down = nn.Linear(16, d), norm, nn.Linear(d, 8)

    def forward(self, x):
        return self.down(self.norm(self.up(x)))


def _hf_rms_norm(d):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return LlamaRMSNorm(d)


def _norm(kind, zero_channels=0):
    torch.manual_seed(0)
    norm = {"layer_norm": lambda: nn.LayerNorm(64), "rms_norm": lambda: nn.RMSNorm(64),
            "hf_rms_norm": lambda: _hf_rms_norm(64)}[kind]()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.weight[:zero_channels] = 0
        if kind == "layer_norm":
            norm.bias.uniform_(-0.2, 0.2)
    return norm


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph-breaks-allowed"])
@pytest.mark.parametrize("kind", ["layer_norm", "rms_norm", "hf_rms_norm"])
def test_norms_keep_the_output_not_the_input_under_the_backend(kind, fullgraph):
    """A norm whose output the next Linear keeps drops its input from the saved tensors:
    by x's bytes less than compile's default, forward equal to it bit for bit, gradients
    as the default's. Without fullgraph, Dynamo refuses data-dependent sizes; the backend
    allows them for its own graph only (the rewrite needs them for the side tensor)."""
    model, x = NormBlock(_norm(kind)), torch.randn(4, 32, 16)
    torch._dynamo.reset()
    default_model = torch.compile(model, backend="inductor", fullgraph=fullgraph)
    y_default = default_model(x)
    default = step(default_model, x)
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    be = fewbit_fx.backend(norms=True, strict=True)
    ours_model = compiled(model, be) if not fullgraph else torch.compile(model, backend=be, fullgraph=True)
    assert torch.equal(ours_model(x), y_default)
    ours = step(ours_model, x)
    (p,) = [p for plan in be.plans for p in plan]
    assert (str(p.site.activation), p.decision.variant, p.site.name) == (kind, "inverted", "norm")
    rows = 4 * 32
    stats = rows * 4 * (2 if kind == "layer_norm" else 1)
    saved = default.bytes - ours.bytes
    assert rows * 64 * 4 - stats <= saved <= rows * 64 * 4, (default.storages, ours.storages)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_without_norms_the_backend_leaves_norms_alone():
    model, x = NormBlock(_norm("layer_norm")), torch.randn(4, 32, 16)
    be = fewbit_fx.backend(strict=True)
    compiled(model, be)(x)
    assert [p for plan in be.plans for p in plan] == []
    torch._dynamo.reset()


def test_zero_gamma_channels_keep_their_inputs_under_the_backend():
    """Channels whose weight is 0 cannot be recovered from y: the compiled op keeps those
    columns of x (a data-dependent number of them) and the gradients stay exact."""
    model, x = NormBlock(_norm("layer_norm", zero_channels=5)), torch.randn(4, 32, 16)
    reference = [g.clone() for g in torch.autograd.grad(model(x).square().mean(), list(model.parameters()))]
    be = fewbit_fx.backend(norms=True, strict=True)
    got = torch.autograd.grad(compiled(model, be)(x).square().mean(), list(model.parameters()))
    assert [p.decision.variant for plan in be.plans for p in plan] == ["inverted"]
    for g, r in zip(got, reference):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_bad_norms_argument():
    for bad in ("yes", 1, None):
        with pytest.raises(TypeError, match="norms"):
            fewbit_fx.backend(norms=bad)


def test_norms_under_a_budget_compile_their_backward_later_too():
    """The backward graph is compiled at the first backward, after the backend returned;
    under a budget the partitioner may recompute the guard's nonzero there, so the
    permission for data-dependent sizes outlives the forward's compile. (A bench run failed
    there with DynamicOutputShapeException: aten.nonzero while the permission was scoped to
    the forward's compile; this test did not reproduce it in isolation, it covers the path.)"""
    from fewbit_fx.evidence import models

    model, args, kwargs = models.build("gpt2", "tiny")
    torch._dynamo.reset()
    be = fewbit_fx.backend(memory_budget=0.5, norms=True, strict=True)
    m = torch.compile(model, backend=be)
    loss = m(*args, **kwargs).logits.float().square().mean()
    loss.backward()
    assert any(str(p.site.activation) == "layer_norm" and p.decision.variant == "inverted"
               for plan in be.plans for p in plan)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    torch._dynamo.reset()
