"""Unit tests of each stage of the graph pass on small hand-made modules:
capture -> detect -> saves -> decide -> rewrite, plus overrides and error messages."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fewbit_fx
from fewbit_fx import activations
from fewbit_fx.api import analyse as plan
from fewbit_fx.nn import FewBit, Inverted
from fewbit_fx.passes import capture, decide, detect, rewrite, saves
from fewbit_fx.passes.capture import CaptureError

D = 8


def x_in(*shape, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*(shape or (2, 4, D)), generator=g).requires_grad_(requires_grad)


def analyse(model, *args, mode="auto", bits=3, overrides=None):
    """Sites with their saves and decisions, by site name."""
    p = plan(model, args, {}, mode, bits, overrides)
    return {item.site.name: item for item in p.planned}


# --- small models ------------------------------------------------------------------------

class ModuleMLP(nn.Module):
    def __init__(self, act=None, frozen_fc2=False):
        super().__init__()
        self.fc1 = nn.Linear(D, 4 * D)
        self.act = act if act is not None else nn.GELU()
        self.fc2 = nn.Linear(4 * D, D)
        self.fc2.requires_grad_(not frozen_fc2)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.c = nn.Linear(D, D)
        self.out = nn.Linear(D, D)

    def forward(self, x):
        h = F.gelu(self.a(x))
        g = torch.sigmoid(self.b(x))
        t = self.c(x).tanh()
        return self.out(h) + g + t


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Functional()
        self.head = nn.Linear(D, D)

    def forward(self, x):
        return self.head(self.inner(x))


class HFFormula(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.activations import NewGELUActivation

        self.fc1 = nn.Linear(D, 4 * D)
        self.act = NewGELUActivation()
        self.fc2 = nn.Linear(4 * D, D)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Viewed(nn.Module):
    """GELU output reshaped and transposed before the Linear that keeps it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x):  # x: (2, 4, D)
        h = self.act(self.fc1(x))
        return self.fc2(h.reshape(2, 4, 2, 4).transpose(1, 2).unsqueeze(0)[0])


class Gated(nn.Module):
    """Llama-style MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, frozen_up=False):
        super().__init__()
        self.gate = nn.Linear(D, 2 * D)
        self.up = nn.Linear(D, 2 * D).requires_grad_(not frozen_up)
        self.act = nn.SiLU()
        self.down = nn.Linear(2 * D, D).requires_grad_(not frozen_up)

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class SharedInput(nn.Module):
    """The GELU's input is also kept by a Linear: rewriting it saves nothing."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.act = nn.GELU()
        self.side = nn.Linear(D, D)

    def forward(self, x):
        h = self.fc1(x)
        return self.act(h).sum(-1, keepdim=True) + self.side(h)


def shared_helper(h):
    return F.gelu(h)  # a module-level function: other callers share it


class SharedHelper(nn.Module):
    """The activation call sits in a helper function that is not the module's own."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, x):
        return self.fc2(shared_helper(self.fc1(x)))


class Untraceable(nn.Module):
    """Data-dependent control flow: Dynamo captures it (graph break), fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, D)
        self.fc2 = nn.Linear(D, D)

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        if h.sum() > -1e9:  # always true, but fx's symbolic trace cannot decide it
            h = h * 1.0
        return self.fc2(h)


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        raise ValueError("this model is broken on purpose")


class Skipped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    @torch._dynamo.disable
    def forward(self, x):
        return F.gelu(self.fc(x))


# --- capture -----------------------------------------------------------------------------

def test_capture_graphs_carry_module_stack():
    model = ModuleMLP()
    cap = capture.capture(model, (x_in(),))
    assert cap.graphs and all(isinstance(g, torch.fx.GraphModule) for g in cap.graphs)
    ops = [n for g in cap.graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops and all(n.meta.get("nn_module_stack") for n in ops)
    paths = {capture.innermost_module(n)[0] for n in ops}
    assert {"fc1", "act", "fc2"} <= paths
    assert capture.innermost_module(next(n for n in ops if n.target is F.gelu)) == ("act", nn.GELU)


def test_capture_leaves_no_trace():
    model = nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.GELU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture.capture(model, (torch.randn(4, D),))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # BatchNorm statistics restored


def test_capture_rng_restored():
    model = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.5))
    x = torch.randn(4, D)
    torch.manual_seed(5)
    capture.capture(model, (x,))
    after_capture = torch.rand(4)
    torch.manual_seed(5)
    plain = torch.rand(4)
    assert torch.equal(after_capture, plain)


@pytest.mark.parametrize("dynamo, expected", [
    ("L['self'].h[0].mlp.act", "h.0.mlp.act"),
    ("L['self']._modules['h']._modules['0'].mlp", "h.0.mlp"),
    ("L['self'].encoder.layer[11]", "encoder.layer.11"),
    ("L['self'].__dict__['_modules']['base_model'].model.h[1]", "base_model.model.h.1"),  # PEFT
    ("L['self']", ""),
])
def test_module_path(dynamo, expected):
    assert capture.module_path(dynamo) == expected


# --- detect ------------------------------------------------------------------------------

def test_detect_module_sites():
    model = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D), nn.SiLU(),
                          nn.Linear(D, D), nn.GELU(approximate="tanh"), nn.Linear(D, D))
    sites = detect.find_sites(capture.capture(model, (x_in(),)).graphs)
    assert [(s.name, s.activation.name) for s in sites] == [
        ("1", "gelu"), ("3", "silu"), ("5", "gelu_tanh")]
    assert all(s.module_path == s.name and s.owner_path == "" for s in sites)


def test_detect_functional_sites():
    sites = detect.find_sites(capture.capture(Outer(), (x_in(),)).graphs)
    assert [(s.name, s.activation.name, s.module_path) for s in sites] == [
        ("inner:gelu#0", "gelu", None),
        ("inner:sigmoid#1", "sigmoid", None),
        ("inner:tanh#2", "tanh", None),
    ]
    assert {s.owner_path for s in sites} == {"inner"}
    # keyed by where the call is in the source (one key per call, however often it runs)
    assert [s.rewrite_key[:2] + s.rewrite_key[3:] for s in sites] == [
        ("call", "inner", 57, "gelu", False), ("call", "inner", 58, "sigmoid", False),
        ("call", "inner", 59, "tanh", True)]
    assert {s.rewrite_key[2] for s in sites} == {__file__}


def test_detect_functional_arguments():
    class M(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh") + F.leaky_relu(x, 0.2) + F.softplus(x, beta=2.0)

    sites = detect.find_sites(capture.capture(M(), (x_in(requires_grad=True),)).graphs)
    assert [s.activation for s in sites] == [
        activations.get("gelu_tanh"), activations.get("leaky_relu", negative_slope=0.2),
        activations.get("softplus", beta=2.0)]


def test_detect_hf_formula_is_one_site():
    pytest.importorskip("transformers")
    sites = detect.find_sites(capture.capture(HFFormula(), (x_in(),)).graphs)
    assert len(sites) == 1
    (s,) = sites
    assert s.name == "act" and s.activation.name == "gelu_tanh_formula"
    assert len(s.nodes) > 1  # pow, mul, add, tanh, ... form one site
    assert capture.innermost_module(s.input)[0] == "fc1"


def test_detect_module_called_twice_shares_key():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(D, D), nn.Linear(D, D), nn.GELU()

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.act(x))))

    sites = detect.find_sites(capture.capture(Twice(), (x_in(requires_grad=True),)).graphs)
    assert len(sites) == 2 and sites[0].rewrite_key == sites[1].rewrite_key == ("module", "act")


class _SquareFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class CustomGelu(nn.Module):  # named like an activation, runs an autograd.Function
    def forward(self, x):
        return _SquareFn.apply(x)


class Swish(nn.Module):  # named like one, computes something else
    def forward(self, x):
        return x * (1 + torch.erf(x))


class GeluMLP(nn.Module):  # named like one, but calls other modules: not an activation
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x) * 2


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, 2 * D)
        self.prelu, self.glu = nn.PReLU(), nn.GLU()
        self.custom, self.swish, self.mlp = CustomGelu(), Swish(), GeluMLP()
        self.act = nn.GELU()  # a supported one, for contrast
        self.out = nn.Linear(D, D)

    def forward(self, x):
        h = self.glu(self.prelu(self.a(x)))
        return self.out(self.act(self.mlp(self.swish(self.custom(h)))))


def test_detect_names_activation_like_modules_it_does_not_rewrite_and_why():
    rep = fewbit_fx.report(Unsupported(), example_inputs=(x_in(requires_grad=True),), measure=False)
    assert [r.site for r in rep.rows] == ["act"]
    notes = "\n".join(rep.notes)
    assert "PReLU at prelu: its slope is a learned parameter" in notes
    assert "GLU at glu: it gates one half" in notes
    assert "CustomGelu at custom: it runs a custom torch.autograd.Function" in notes
    assert "Swish at swish: its forward is not one of the supported activations" in notes
    assert "GeluMLP" not in notes and "GELU at" not in notes
    assert all(line in str(rep) for line in rep.notes)


# --- saves -------------------------------------------------------------------------------

def test_saves_trainable_linear_keeps_its_input():
    site = analyse(ModuleMLP(), x_in())["act"]
    assert any("fc2" in k for k in site.saves.y_kept_by)
    assert site.saves.saved_before == 2 * 4 * 4 * D * 4  # GELU keeps its fp32 input


def test_saves_frozen_linear_does_not_keep_its_input():
    site = analyse(ModuleMLP(frozen_fc2=True), x_in())["act"]
    assert site.saves.y_kept_by == []
    assert site.saves.saved_before > 0


def test_saves_mul_keeps_other_operand():
    site = analyse(Gated(), x_in())["act"]
    assert any(k.startswith("mul") for k in site.saves.y_kept_by), site.saves.y_kept_by
    # frozen up/down: up(x) does not require grad, so mul does not keep silu's output
    site = analyse(Gated(frozen_up=True), x_in())["act"]
    assert not any(k.startswith("mul") for k in site.saves.y_kept_by), site.saves.y_kept_by


def compiled_plan(model, x, mode="auto"):
    """Decisions as the fewbit backend makes them (for torch.compile's partitioner)."""
    from fewbit_fx.passes.plan import plan_graphs

    graphs = capture.capture(model, (x,), {}).graphs
    return {p.site.name: p for p in plan_graphs(graphs, mode, 3, None, compiled=True)}


class GatedAndProjected(Gated):
    """The gated activation's output also feeds a Linear, so it is materialized anyway."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(2 * D, D)

    def forward(self, x):
        y = self.act(self.gate(x))
        return self.down(y * self.up(x)) + self.side(y)


@pytest.mark.parametrize("mode", ["auto", "fewbit", "exact"])
def test_compiled_plan_keeps_sites_whose_output_only_pointwise_ops_keep(mode):
    """In a gated MLP the partitioner recomputes silu(x) for the mul: x is kept anyway."""
    site = compiled_plan(Gated(), x_in(), mode)["act"]
    assert site.decision.variant == "kept"
    assert site.saves.saved_before == 0
    assert "recomputes" in site.decision.reason and "mul" in site.decision.reason
    # eager autograd keeps both, so optimize() still rewrites it
    assert analyse(Gated(), x_in(), mode=mode)["act"].decision.variant != "kept"


def test_compiled_plan_still_rewrites_when_a_matmul_keeps_the_output():
    assert compiled_plan(ModuleMLP(), x_in())["act"].decision.variant == "inverted"
    assert compiled_plan(GatedAndProjected(), x_in())["act"].decision.variant == "inverted"
    assert compiled_plan(ModuleMLP(frozen_fc2=True), x_in())["act"].decision.variant == "fewbit"


def test_saves_views_are_followed():
    site = analyse(Viewed(), x_in())["act"]
    assert any("fc2" in k for k in site.saves.y_kept_by), site.saves.y_kept_by


def test_saves_copy_is_not_a_view():
    """.contiguous() of a transposed tensor copies: the Linear keeps the copy, not y."""
    class Copied(Viewed):
        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h.reshape(2, 4, 2, 4).transpose(1, 2).contiguous())

    site = analyse(Copied(), x_in())["act"]
    assert site.saves.y_kept_by == []


def test_saves_input_kept_elsewhere():
    item = analyse(SharedInput(), x_in())["act"]
    assert item.saves.saved_before == 0
    assert any("side" in k for k in item.saves.x_kept_by)
    assert item.decision.variant == "kept" and "side" in item.decision.reason


def test_saves_no_grad_keeps_nothing():
    model = ModuleMLP().requires_grad_(False)
    item = analyse(model, x_in())["act"]
    assert item.saves.saved_before == 0 and item.decision.variant == "kept"


# --- decide ------------------------------------------------------------------------------

def _saves(**kw):
    base = dict(numel=1024, dtype=torch.float32, shape=(1024,), saved_before=4096)
    return saves.SiteSaves(**{**base, **kw})


GELU_SITE = SimpleNamespace(activation=activations.get("gelu"), checkpointed=False)
SIGMOID_SITE = SimpleNamespace(activation=activations.get("sigmoid"), checkpointed=False)
CHECKPOINTED_GELU = SimpleNamespace(activation=activations.get("gelu"), checkpointed=True)


def test_decide_three_outcomes():
    inv = decide.decide(GELU_SITE, _saves(y_kept_by=["linear in fc2"]), "auto", 3)
    assert inv.variant == "inverted" and inv.saved_after == 1024 // 8  # the 1-bit branch mask
    assert "fc2" in inv.reason
    few = decide.decide(GELU_SITE, _saves(), "auto", 3)
    assert few.variant == "fewbit" and few.bits == 3 and few.label == "fewbit-3"
    assert few.saved_after == 1024 * 3 // 8 + 1  # codes, the non-finite flag byte (levels: a buffer)
    kept = decide.decide(GELU_SITE, _saves(saved_before=0, x_kept_by=["linear in side"]), "auto", 3)
    assert kept.variant == "kept" and kept.saved_after == 0 and "side" in kept.reason


def test_decide_monotone_inverted_needs_no_mask():
    d = decide.decide(SIGMOID_SITE, _saves(y_kept_by=["linear in fc2"]), "exact", 3)
    assert d.variant == "inverted" and d.saved_after == 0


def test_decide_modes():
    y_kept, y_free = _saves(y_kept_by=["linear in fc2"]), _saves()
    assert decide.decide(GELU_SITE, y_kept, "exact", 3).variant == "inverted"
    assert decide.decide(GELU_SITE, y_kept, "fewbit", 3).variant == "fewbit"
    # exact mode never picks few-bit: keeping y (+mask) instead of x saves nothing
    d = decide.decide(GELU_SITE, y_free, "exact", 3)
    assert d.variant == "kept" and "no less" in d.reason
    assert decide.decide(GELU_SITE, y_free, "fewbit", 2).label == "fewbit-2"
    assert decide.decide(GELU_SITE, y_kept, "keep", 3).variant == "kept"
    # y modified in place later: no inverted, few-bit in auto, kept in exact
    mutated = _saves(y_kept_by=["linear in fc2"], y_mutated=True)
    assert decide.decide(GELU_SITE, mutated, "auto", 3).variant == "fewbit"
    assert decide.decide(GELU_SITE, mutated, "exact", 3).variant == "kept"


def test_decide_in_a_checkpointed_region_decides_as_elsewhere_and_says_where():
    for mode, variant in (("auto", "inverted"), ("exact", "inverted"), ("fewbit", "fewbit")):
        inside = decide.decide(CHECKPOINTED_GELU, _saves(y_kept_by=["linear in fc2"]), mode, 3)
        outside = decide.decide(GELU_SITE, _saves(y_kept_by=["linear in fc2"]), mode, 3)
        assert inside.variant == outside.variant == variant
        assert inside.saved_after == outside.saved_after
        assert inside.reason == f"{outside.reason} ({decide.CHECKPOINTED})"


def test_decide_on_graphs_three_outcomes():
    assert analyse(ModuleMLP(), x_in())["act"].decision.variant == "inverted"
    assert analyse(ModuleMLP(frozen_fc2=True), x_in())["act"].decision.label == "fewbit-3"
    assert analyse(SharedInput(), x_in())["act"].decision.variant == "kept"
    frozen_exact = analyse(ModuleMLP(frozen_fc2=True), x_in(), mode="exact")["act"]
    assert frozen_exact.decision.variant == "kept"
    assert analyse(ModuleMLP(), x_in(), mode="fewbit", bits=4)["act"].decision.label == "fewbit-4"


def test_overrides_by_module_path_pattern():
    model = nn.Sequential(*(ModuleMLP() for _ in range(3)))
    planned = analyse(model, x_in(), overrides={"0.*": "keep", "1.act": "fewbit-2", "*": "auto"})
    assert planned["0.act"].decision.variant == "kept"
    assert planned["0.act"].decision.reason == "kept by an override"
    assert planned["1.act"].decision.label == "fewbit-2"
    assert planned["2.act"].decision.variant == "inverted"
    # first matching pattern wins
    site = SimpleNamespace(name="h.0.mlp.act")
    assert decide.site_mode(site, "auto", 3, {"h.*": "exact", "*": "keep"}) == ("exact", 3)
    assert decide.site_mode(site, "auto", 3, {"x.*": "exact"}) == ("auto", 3)


@pytest.mark.parametrize("overrides, error, entry", [
    ({"*": "fewbit-x"}, ValueError, "overrides['*'] = 'fewbit-x'"),  # was "invalid literal for int()"
    ({"*": "fewbit-9"}, ValueError, "overrides['*'] = 'fewbit-9'"),
    ({"*": None}, TypeError, "overrides['*'] = None"),  # was an AttributeError
    ({"act": "exactly"}, ValueError, "overrides['act'] = 'exactly'"),
    (["act", "keep"], TypeError, "got list ['act', 'keep']"),  # was an AttributeError
])
def test_bad_overrides_name_the_argument_the_entry_and_the_choices(overrides, error, entry):
    site = SimpleNamespace(name="act")
    for call in (lambda: decide.site_mode(site, "auto", 3, overrides), lambda: decide.check_overrides(overrides),
                 lambda: analyse(ModuleMLP(), x_in(), overrides=overrides)):
        with pytest.raises(error) as info:
            call()
        msg = str(info.value)
        assert "overrides" in msg and entry in msg, msg
        for choice in ("'auto'", "'exact'", "'fewbit'", "'fewbit-<b>'", "1..8", "'keep'"):
            assert choice in msg, msg


def test_bad_override_raises_even_if_no_site_matches_it():
    with pytest.raises(ValueError, match="overrides"):
        decide.site_mode(SimpleNamespace(name="act"), "auto", 3, {"act": "keep", "zzz": "fewbit-0"})


def test_override_values_that_stay_valid():
    site = SimpleNamespace(name="act")
    for value, expected in [("fewbit-1", ("fewbit", 1)), ("fewbit-8", ("fewbit", 8)), ("fewbit", ("fewbit", 3)),
                            ("keep", ("keep", 3)), ("exact", ("exact", 3)), ("auto", ("auto", 3))]:
        assert decide.site_mode(site, "auto", 3, {"*": value}) == expected
    assert decide.site_mode(site, "auto", 3, None) == ("auto", 3)


def test_overrides_functional_site_names():
    planned = analyse(Outer(), x_in(), overrides={"inner:gelu#*": "keep"})
    assert planned["inner:gelu#0"].decision.variant == "kept"


# --- rewrite -----------------------------------------------------------------------------

def test_rewrite_module_swap_keeps_hooks_and_mode():
    model = ModuleMLP()
    fired = []
    model.act.register_forward_hook(lambda m, i, o: fired.append(type(m).__name__))
    model.act.eval()  # an odd per-module mode must survive the swap
    x = x_in()
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert isinstance(model.act, Inverted) and model.act.training is False
    fired.clear()
    assert torch.equal(model(x), expected)
    assert fired == ["Inverted"]


def test_rewrite_functional_sites_bound_to_instance():
    model = Outer()
    x = x_in()
    expected = model(x)
    keys = set(model.state_dict())
    fewbit_fx.optimize(model, example_inputs=(x,))
    inner = model.inner
    assert type(inner) is Functional and "forward" in inner.__dict__
    children = {n: type(m) for n, m in inner.named_children()}
    assert children["fewbit_gelu_0"] is Inverted and children["fewbit_sigmoid_1"] is FewBit
    assert children["fewbit_tanh_2"] is FewBit  # its output is only added
    assert set(model.state_dict()) == keys
    assert torch.equal(model(x), expected)
    # the bound forward reads the instance's attributes: a new weight is used
    with torch.no_grad():
        inner.a.weight.zero_()
    assert not torch.equal(model(x), expected)


def test_rewrite_functional_children_follow_owner_mode():
    model = Outer().eval()
    fewbit_fx.optimize(model, example_inputs=(x_in(),))
    assert isinstance(model.inner.fewbit_gelu_0, Inverted)
    assert not any(m.training for m in model.modules())


def test_rewrite_keeps_data_dependent_branches():
    """fx could not trace this forward; the source-level rewrite keeps its branch."""
    model = Untraceable()
    x = x_in()
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert isinstance(model.fewbit_gelu_0, (Inverted, FewBit))
    assert torch.equal(model(x), expected)
    assert torch.equal(model(-1e12 * torch.ones_like(x)), Untraceable.forward(model, -1e12 * torch.ones_like(x)))


def test_rewrite_shared_helper_left_alone_with_reason():
    model = SharedHelper()
    x = x_in()
    expected = model(x)
    rep = fewbit_fx.report(model, example_inputs=(x,), measure=False)
    (row,) = rep.rows
    assert row.variant == "kept"
    assert "not rewritten" in row.reason and "shared_helper()" in row.reason
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert "forward" not in model.__dict__  # left exactly as it was
    assert torch.equal(model(x), expected)  # and it still runs
    assert fewbit_fx.report(model).rows[0].variant == "kept"


def test_rewrite_failure_leaves_model_untouched():
    """A failing functional owner does not stop other sites, and stages before mutating."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = ModuleMLP()
            self.bad = SharedHelper()

        def forward(self, x):
            return self.bad(self.mlp(x))

    model = Mixed()
    x = x_in()
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert isinstance(model.mlp.act, Inverted)
    assert "forward" not in model.bad.__dict__
    assert torch.equal(model(x), expected)


def test_rewrite_apply_directly_reports_failures():
    model = SharedHelper()
    p = plan(model, (x_in(),), {}, "auto", 3, None)
    applied = rewrite.apply(model, p.planned)
    failures = applied.failures
    (key,) = failures
    assert key not in applied.modules
    assert "is in shared_helper(), which is not SharedHelper.forward" in failures[key]


def test_optimize_twice_is_safe():
    model = Outer()
    x = x_in()
    expected = model(x)
    fewbit_fx.optimize(model, example_inputs=(x,))
    fewbit_fx.optimize(model, example_inputs=(x,))
    assert torch.equal(model(x), expected)
    assert sum(isinstance(m, Inverted) for m in model.modules()) == 1


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="fast"), "mode must be one of"),
    (dict(bits=0), "bits must be an integer from 1 to 8"),
    (dict(bits=9), "bits must be an integer from 1 to 8"),
    (dict(bits=True), "bits must be an integer"),
    (dict(bits=2.5), "bits must be an integer"),
    (dict(overrides={"act": "fewbit-12"}), r"overrides\['act'\] = 'fewbit-12' is not a valid choice"),
    (dict(overrides={"act": "fastest"}), r"overrides\['act'\] = 'fastest' is not a valid choice"),
])
def test_bad_arguments(kwargs, match):
    model = ModuleMLP()
    with pytest.raises(ValueError, match=match):
        fewbit_fx.optimize(model, example_inputs=(x_in(),), **kwargs)
    if "overrides" not in kwargs:
        with pytest.raises(ValueError, match=match):
            fewbit_fx.optimize(model, **kwargs)  # checked before the first call, too
        with pytest.raises(ValueError, match=match):
            fewbit_fx.report(model, example_inputs=(x_in(),), **kwargs)
    assert isinstance(model.act, nn.GELU)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fewbit_fx.optimize(lambda x: x, example_inputs=(x_in(),))


def test_erroring_model_names_the_problem():
    with pytest.raises(CaptureError, match="Failing.*this model is broken on purpose"):
        fewbit_fx.optimize(Failing(), example_inputs=(x_in(),))
    with pytest.raises(CaptureError, match="runs eagerly"):
        fewbit_fx.report(Failing(), example_inputs=(x_in(),))


def test_wrong_inputs_name_the_problem():
    with pytest.raises(CaptureError, match="ModuleMLP"):
        fewbit_fx.optimize(ModuleMLP(), example_inputs=(torch.randn(2, 3),))


def test_untraceable_by_dynamo_is_a_clear_error():
    with pytest.raises(CaptureError, match="no graph for Skipped"):
        fewbit_fx.optimize(Skipped(), example_inputs=(x_in(),))


def test_report_needs_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        fewbit_fx.report(ModuleMLP())


def test_no_activation_model_is_fine():
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
    rep = fewbit_fx.report(model, example_inputs=(x_in(),))
    assert rep.rows == [] and rep.total_before == 0
    ref = copy.deepcopy(model)
    fewbit_fx.optimize(model, example_inputs=(x_in(),))
    assert torch.equal(model(x_in()), ref(x_in()))


class SharedAct(nn.Module):
    """One activation module at two sites; the second one's output is modified in place,
    so inverted cannot serve it (issue 18, item 4)."""

    def __init__(self):
        super().__init__()
        self.big, self.small, self.out = nn.Linear(D, 4 * D), nn.Linear(D, 4 * D), nn.Linear(4 * D, D)
        self.act = nn.GELU()

    def forward(self, x):
        a = self.act(self.big(x))
        b = self.act(self.small(x))
        b.add_(1)
        return self.out(a) + b.sum()


@pytest.mark.parametrize("mode", ["auto", "exact"])
def test_shared_module_gets_one_variant_every_site_accepts(mode):
    x = x_in()
    model = SharedAct()
    reference = copy.deepcopy(model)
    fewbit_fx.optimize(model, example_inputs=(x,), mode=mode)
    rows = fewbit_fx.report(model).rows
    assert len({r.variant for r in rows}) == 1 and rows[0].variant != "inverted"
    assert torch.equal(model(x), reference(x))
    model(x).sum().backward()  # crashed in backward when the module was swapped for Inverted


def test_optimize_an_optimized_model_decides_afresh():
    """auto then exact: no few-bit site may survive into exact mode (issue 18, item 5)."""
    x = x_in()
    model = ModuleMLP(frozen_fc2=True)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="auto")
    assert isinstance(model.act, FewBit)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    assert not any(isinstance(m, FewBit) for m in model.modules())
    # frozen consumer: inverted would save what the original saves, so exact keeps it
    assert [r.variant for r in fewbit_fx.report(model).rows] == ["kept"]
    assert type(model.act) is nn.GELU


def _setitem(y):
    y[:, 0] = 0


def _after_a_break(y):
    torch._dynamo.graph_break()
    y.mul_(2)


MUTATIONS = {
    "clamp_": lambda y: torch.clamp_(y, -0.1, 0.1),
    "leaky_relu_": lambda y: F.leaky_relu_(y, 0.2),
    "threshold_": lambda y: F.threshold_(y, 0.1, 0.0),
    "hardtanh_": lambda y: F.hardtanh_(y),
    "positional inplace": lambda y: F.leaky_relu(y, 0.2, True),
    "setitem": _setitem,
    "after a graph break": _after_a_break,
}


class MutatedOutput(nn.Module):
    def __init__(self, mutate):
        super().__init__()
        self.fc1, self.fc2, self.mutate = nn.Linear(D, 4 * D), nn.Linear(4 * D, D), mutate

    def forward(self, x):
        y = F.gelu(self.fc1(x))
        self.mutate(y)
        return self.fc2(y)


@pytest.mark.parametrize("mode", ["exact", "auto"])
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_an_activation_output_modified_in_place_is_never_saved(name, mode):
    """Inverted saves y; an in-place change of y that the analysis missed made backward
    raise "modified by an inplace operation" (issue 18, item 6)."""
    x = x_in(requires_grad=True)
    model = MutatedOutput(MUTATIONS[name])
    reference = copy.deepcopy(model)
    fewbit_fx.optimize(model, example_inputs=(x,), mode=mode)
    assert not any(isinstance(m, Inverted) for m in model.modules()), fewbit_fx.report(model)
    out, ref = model(x), reference(x)
    assert torch.equal(out, ref)
    out.sum().backward()  # raised before


@torch._dynamo.disable
def _mutate_untraced(h):
    h.mul_(2)  # runs eagerly between two captured graphs


class ConsumerAcrossABreak(nn.Module):
    def __init__(self, between=None):
        super().__init__()
        self.up, self.down, self.between = nn.Linear(D, 4 * D), nn.Linear(4 * D, D), between

    def forward(self, x):
        h = F.gelu(self.up(x))
        torch._dynamo.graph_break()
        if self.between is not None:
            self.between(h)
        return self.down(h)


def test_a_consumer_across_a_graph_break_is_seen():
    x = x_in()
    rep = fewbit_fx.report(ConsumerAcrossABreak(), example_inputs=(x,), measure=False)
    (row,) = rep.rows
    assert row.variant == "inverted" and "(in a later graph)" in row.reason
    model = ConsumerAcrossABreak()
    reference = copy.deepcopy(model)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    assert torch.equal(model(x), reference(x))


def test_a_change_between_two_graphs_is_seen():
    x = x_in()
    model = ConsumerAcrossABreak(_mutate_untraced)
    reference = copy.deepcopy(model)
    fewbit_fx.optimize(model, example_inputs=(x,), mode="exact")
    assert fewbit_fx.report(model).rows[0].variant == "kept"
    out = model(x)
    assert torch.equal(out, reference(x))
    out.sum().backward()


def test_an_override_that_matches_no_site_warns_with_close_matches():
    with pytest.warns(UserWarning, match=r"override 'actt' matches no site; close: act"):
        fewbit_fx.report(ModuleMLP(), example_inputs=(x_in(),), overrides={"actt": "keep"}, measure=False)


def test_a_model_without_activations_says_so():
    model = nn.Sequential(nn.Linear(D, D), nn.Linear(D, D))
    with pytest.warns(UserWarning, match="no supported activation"):
        fewbit_fx.optimize(model, example_inputs=(x_in(),))
    assert "no supported activation" in fewbit_fx.report(model, example_inputs=(x_in(),)).notes[0]


def test_reasons_are_true_in_forced_fewbit_mode():
    """mode="fewbit" where a consumer keeps the output must not say that none does, and the
    bits it replaces are what the site held (a formula GELU holds several tensors)."""
    rep = fewbit_fx.report(ModuleMLP(), example_inputs=(x_in(),), mode="fewbit", measure=False)
    (row,) = rep.rows
    assert row.variant == "fewbit-3"
    assert "no consumer keeps" not in row.reason and "keeps the output" in row.reason
    assert "instead of 32" in row.reason  # it held one fp32 tensor
