"""The activation registry (fewbit_fx.activations): lookups, module mapping, the math
each entry claims (exact forward, derivative, monotonicity, minimum, twins), and that the
tables detect, saves, inverse and the kernels derive from it cover every entry."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fewbit_fx.activations import (
    HF_CLASSES, SPECS, SUPPORTED, Activation, ClosedForm, Numerical, Spec, Twin, from_module, get,
)
from fewbit_fx.passes import detect, saves

try:
    import transformers.activations as hf
except Exception:  # pragma: no cover - optional dependency
    hf = None

needs_hf = pytest.mark.skipif(hf is None, reason="transformers is not installed")

# (module factory, registry name, params) for every torch.nn module the registry knows.
TORCH_MODULES = [
    (lambda: nn.GELU(), "gelu", {}),
    (lambda: nn.GELU(approximate="tanh"), "gelu_tanh", {}),
    (lambda: nn.SiLU(), "silu", {}),
    (lambda: nn.Mish(), "mish", {}),
    (lambda: nn.Sigmoid(), "sigmoid", {}),
    (lambda: nn.Tanh(), "tanh", {}),
    (lambda: nn.Softplus(beta=2, threshold=5), "softplus", {"beta": 2.0, "threshold": 5.0}),
    (lambda: nn.Softplus(), "softplus", {"beta": 1.0, "threshold": 20.0}),
    (lambda: nn.ELU(alpha=0.7), "elu", {"alpha": 0.7}),
    (lambda: nn.SELU(), "selu", {}),
    (lambda: nn.CELU(alpha=1.3), "celu", {"alpha": 1.3}),
    (lambda: nn.LeakyReLU(0.2), "leaky_relu", {"negative_slope": 0.2}),
    (lambda: nn.ReLU(), "relu", {}),
    (lambda: nn.ReLU6(), "relu6", {}),
    (lambda: nn.Hardswish(), "hardswish", {}),
    (lambda: nn.Hardsigmoid(), "hardsigmoid", {}),
    (lambda: nn.Hardtanh(-2, 3), "hardtanh", {"min_val": -2.0, "max_val": 3.0}),
    (lambda: nn.LogSigmoid(), "logsigmoid", {}),
    (lambda: nn.Softsign(), "softsign", {}),
    (lambda: nn.Tanhshrink(), "tanhshrink", {}),
]

HF_MODULES = [
    ("NewGELUActivation", {}, "gelu_tanh_formula"),
    ("FastGELUActivation", {}, "gelu_fast_formula"),
    ("QuickGELUActivation", {}, "quick_gelu"),
    ("GELUActivation", {"use_gelu_python": True}, "gelu_erf_formula"),
    ("GELUActivation", {}, "gelu"),
]

NON_MONOTONE = {
    "gelu", "gelu_tanh", "silu", "mish", "hardswish",
    "gelu_tanh_formula", "gelu_fast_formula", "gelu_erf_formula", "quick_gelu",
    "swish", "mish_formula", "gelu_tanh_pow_formula", "gelu_tanh_cube_formula", "gelu_tanh_fast_formula",
}


def _ids(cases):
    return [c[1] + ("" if not c[2] else str(sorted(c[2].values()))) for c in cases]


# --- registry -------------------------------------------------------------------------
def test_supported_lists_every_module_activation():
    assert len(set(SUPPORTED)) == len(SUPPORTED)
    for _, name, _ in TORCH_MODULES:
        assert name in SUPPORTED


def test_get_unknown_name_names_supported():
    with pytest.raises(TypeError, match="supported") as info:
        get("softmax")
    assert "gelu" in str(info.value) and "relu" in str(info.value)


def test_get_unknown_parameter():
    with pytest.raises(TypeError, match="negative_slope"):
        get("leaky_relu", slope=0.1)
    with pytest.raises(TypeError):
        get("gelu", alpha=1.0)


def test_get_defaults_match_torch_modules():
    assert get("softplus") == from_module(nn.Softplus())
    assert get("elu") == from_module(nn.ELU())
    assert get("celu") == from_module(nn.CELU())
    assert get("leaky_relu") == from_module(nn.LeakyReLU())
    assert get("hardtanh") == from_module(nn.Hardtanh())


def test_activation_is_hashable_and_value_equal():
    a, b = get("elu", alpha=0.7), get("elu", alpha=0.7)
    assert a == b and hash(a) == hash(b)
    assert a != get("elu", alpha=0.5)
    assert {a: 1}[b] == 1
    assert a.param_list == [0.7]
    assert str(a) == "elu(alpha=0.7)"


@pytest.mark.parametrize("factory, name, params", TORCH_MODULES, ids=_ids(TORCH_MODULES))
def test_from_module(factory, name, params):
    a = from_module(factory())
    assert isinstance(a, Activation)
    assert a.name == name
    assert a.p == pytest.approx(params)


def test_relu6_is_not_mistaken_for_its_hardtanh_base_class():
    assert isinstance(nn.ReLU6(), nn.Hardtanh)
    assert from_module(nn.ReLU6()).name == "relu6"


def test_inplace_flag_does_not_matter():
    assert from_module(nn.ReLU(inplace=True)) == from_module(nn.ReLU())
    assert from_module(nn.SiLU(inplace=True)) == from_module(nn.SiLU())


@pytest.mark.parametrize("module", [nn.Softmax(dim=-1), nn.Linear(2, 2), nn.PReLU(), nn.Softshrink()])
def test_from_module_unsupported_names_supported(module):
    with pytest.raises(TypeError, match="unsupported activation module") as info:
        from_module(module)
    msg = str(info.value)
    assert type(module).__name__ in msg
    for supported in ("GELU", "SiLU", "ReLU", "Tanhshrink"):
        assert supported in msg


@needs_hf
@pytest.mark.parametrize("cls, kwargs, name", HF_MODULES, ids=[f"{c}{k}" for c, k, _ in HF_MODULES])
def test_from_hf_module(cls, kwargs, name):
    assert from_module(getattr(hf, cls)(**kwargs)).name == name


# --- math -----------------------------------------------------------------------------
def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g, dtype=torch.float64) * 3
    x = torch.cat([x, torch.linspace(-12, 12, 1001, dtype=torch.float64)])
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factory, name, params", TORCH_MODULES, ids=_ids(TORCH_MODULES))
def test_forward_is_the_module_bit_for_bit(factory, name, params, dtype):
    x = _inputs(dtype)
    assert torch.equal(from_module(factory()).forward(x), factory()(x))


@needs_hf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls, kwargs, name", HF_MODULES, ids=[f"{c}{k}" for c, k, _ in HF_MODULES])
def test_hf_forward_is_the_module_bit_for_bit(cls, kwargs, name, dtype):
    x = _inputs(dtype)
    module = getattr(hf, cls)(**kwargs)
    assert torch.equal(from_module(module).forward(x), module(x))


def test_forward_never_writes_into_its_input():
    x = _inputs(torch.float32)
    before = x.clone()
    for factory in (lambda: nn.ReLU(inplace=True), lambda: nn.SiLU(inplace=True),
                    lambda: nn.ELU(inplace=True), lambda: nn.Hardtanh(inplace=True)):
        y = from_module(factory()).forward(x)
        assert torch.equal(x, before)
        assert y.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("name", SUPPORTED)
def test_derivative_matches_autograd(name):
    a = get(name)
    x = _inputs(torch.float64).requires_grad_(True)
    (expected,) = torch.autograd.grad(a.forward(x).sum(), x)
    assert torch.equal(a.derivative(x.detach()), expected)


@pytest.mark.parametrize("name", SUPPORTED)
def test_monotone_flags(name):
    a = get(name)
    assert a.monotone == (name not in NON_MONOTONE)
    assert a.needs_mask == (not a.monotone)
    if a.monotone:
        assert a.x_min is None
    # Empirically: a monotone function never decreases on a fine grid.
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    y = a.forward(x)
    if a.monotone:
        assert bool((y[1:] >= y[:-1]).all())
    else:
        assert bool((y[1:] < y[:-1]).any())


@pytest.mark.parametrize(
    "act, expected",
    [
        (get("leaky_relu", negative_slope=-0.1), False),
        (get("leaky_relu", negative_slope=0.0), True),
        (get("elu", alpha=-0.5), False),
        (get("celu", alpha=1.0), True),
    ],
    ids=str,
)
def test_monotone_depends_on_parameters(act, expected):
    assert act.monotone == expected


@pytest.mark.parametrize(
    "name, expected",
    [("gelu", -0.7517915246), ("silu", -1.2784645428), ("mish", -1.1924312), ("hardswish", -1.5)],
)
def test_x_min_known_values(name, expected):
    assert get(name).x_min == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(NON_MONOTONE - {"hardswish"}))
def test_x_min_is_where_the_derivative_vanishes(name):
    a = get(name)
    x0 = a.x_min
    d = a.derivative(torch.tensor([x0 - 1e-3, x0, x0 + 1e-3], dtype=torch.float64))
    assert d[0] < 0 < d[2]
    assert abs(float(d[1])) < 1e-7


@pytest.mark.parametrize(
    "name, twin, scale",
    [
        ("gelu_tanh_formula", "gelu_tanh", 1.0),
        ("gelu_fast_formula", "gelu_tanh", 1.0),
        ("gelu_erf_formula", "gelu", 1.0),
        ("quick_gelu", "silu", 1.702),
        ("swish", "silu", 1.0),
        ("swish(beta=0.1)", "silu", 0.1),
        ("swish(beta=2.5)", "silu", 2.5),
        ("mish_formula", "mish", 1.0),
        ("gelu_tanh_pow_formula", "gelu_tanh", 1.0),
        ("gelu_tanh_cube_formula(k=0.7978845608)", "gelu_tanh", 1.0),
        ("gelu_tanh_fast_formula(k=0.79788456)", "gelu_tanh", 1.0),
    ],
)
def test_formula_twins_are_mathematically_equal(name, twin, scale):
    a = _parse(name)
    t, s = a.twin
    assert t == get(twin) and s == scale
    assert not a.exact_from_output
    x = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    # f(x) = twin(s*x)/s (FastGELU's rounded constant differs from sqrt(2/pi) by ~1e-10).
    assert torch.allclose(a.forward(x), t.forward(s * x) / s, rtol=0, atol=1e-8)
    assert torch.allclose(a.derivative(x), t.derivative(s * x), rtol=0, atol=1e-8)


def _parse(text: str) -> Activation:
    """get() from "name" or "name(p=v, ...)"."""
    name, _, args = text.rstrip(")").partition("(")
    return get(name, **{k.strip(): float(v) for k, v in (a.split("=") for a in args.split(",") if a)})


@pytest.mark.parametrize("text", ["swish(beta=0.1)", "swish(beta=0.05)", "swish(beta=3)"])
def test_a_scaled_twin_has_its_minimum_where_the_derivative_vanishes(text):
    a = _parse(text)  # beta < 0.21 puts it left of -6, where bisection would not look
    assert a.x_min == pytest.approx(get("silu").x_min / a.p["beta"], rel=1e-12)
    d = a.derivative(torch.tensor([a.x_min - 1e-3, a.x_min, a.x_min + 1e-3], dtype=torch.float64))
    assert d[0] < 0 < d[2] and abs(float(d[1])) < 1e-7


@pytest.mark.parametrize("name, params", [("swish", {"beta": 0.0}), ("swish", {"beta": -1.0}),
                                          ("swish", {"beta": math.inf}),
                                          ("gelu_tanh_cube_formula", {"k": 0.8}),
                                          ("gelu_tanh_pow_formula", {"c": 0.045})])
def test_formula_constants_outside_what_the_twin_serves_are_refused(name, params):
    with pytest.raises(ValueError):
        get(name, **params)


def test_exact_from_output_split():
    numerical = {"gelu", "gelu_tanh", "silu", "mish", "tanhshrink"}
    for name in SUPPORTED:
        a = get(name)
        if a.twin is not None:
            assert not a.exact_from_output
        else:
            assert a.exact_from_output == (name not in numerical), name


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_jump_of_the_derivative_is_a_listed_kink(name):
    a = get(name)
    x = torch.linspace(-9, 9, 180001, dtype=torch.float64)
    d = a.derivative(x)
    jumps = (d[1:] - d[:-1]).abs()
    keep = torch.ones_like(jumps, dtype=torch.bool)
    for k in a.kinks:  # drop the grid steps next to a listed kink
        keep &= ((x[1:] - k).abs() > 1e-3) & ((x[:-1] - k).abs() > 1e-3)
    jumps = jumps[keep]
    assert float(jumps.max()) < 1e-2, name


@pytest.mark.parametrize("module, where", [(nn.ReLU(), 0.0), (nn.ReLU6(), 6.0), (nn.Hardsigmoid(), -3.0),
                                           (nn.Hardswish(), 3.0), (nn.SELU(), 0.0), (nn.LeakyReLU(0.2), 0.0)])
def test_listed_kinks_include_real_jumps(module, where):
    a = from_module(module)
    assert where in a.kinks
    d = a.derivative(torch.tensor([where - 1e-6, where + 1e-6], dtype=torch.float64))
    assert abs(float(d[1] - d[0])) > 0.1


def test_softplus_kink_depends_on_parameters():
    assert get("softplus", beta=2.0, threshold=5.0).kinks == (2.5,)
    assert get("hardtanh", min_val=-2.0, max_val=3.0).kinks == (-2.0, 3.0)


def test_selu_constants():
    a = get("selu")
    x = torch.tensor([-1.0], dtype=torch.float64)
    alpha, scale = 1.6732632423543772, 1.0507009873554805
    assert float(a.forward(x)) == pytest.approx(scale * alpha * (math.exp(-1) - 1), rel=1e-15)
    assert torch.equal(a.forward(x), F.selu(x))


# --- the registry is the only source: every derived table covers every entry -------------
# detect, saves, inverse and the kernels build their tables from activations.SPECS; these
# tests fail for an entry that is only half declared (one nobody can call, a target that
# computes something else, a wrong claim about what torch keeps, a missing inverse or
# kernel branch). The math of each entry is checked above and, over SUPPORTED, in
# tests/ops (inverted and few-bit gradients) and tests/kernels.


def _x(dtype=torch.float64):
    return torch.cat([_inputs(dtype), torch.tensor([0.0, -3.0, 3.0, 6.0, -1.5], dtype=dtype)])


def _variants_of(name):
    """(argument, value, entry) for each other entry that an argument value selects."""
    spec = SPECS[name]
    return [(arg, value, other) for arg, choices in spec.variants.items() for value, other in choices.items()]


def _all_calls(spec):
    return [*spec.functions, *spec.inplace_functions, *spec.methods, *spec.inplace_methods]


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_entry_can_be_found(name):
    """Reachable from a call, a method, a module or a Hugging Face class (or as another
    entry's variant), else detect never finds it."""
    spec = SPECS[name]
    as_variant = {other for s in SPECS.values() for choices in s.variants.values() for other in choices.values()}
    # formula entries are also found by graph pattern (passes/formulas), in any code
    assert _all_calls(spec) or spec.modules or spec.hf_classes or name in as_variant or spec.formula, name
    for target in spec.functions:
        assert detect._FUNCTIONS[target][0] == name and target not in detect._INPLACE
    for target in spec.inplace_functions:
        assert detect._FUNCTIONS[target][0] == name and target in detect._INPLACE
    for m in spec.methods + spec.inplace_methods:
        assert detect._METHODS[m] == name and (m in detect._INPLACE) == (m in spec.inplace_methods)
    for cls in spec.hf_classes:
        fake = type(cls, (nn.Module,), {"__module__": "transformers.activations"})
        assert detect._activation_module_class(fake, 1) is not None
        if spec.formula:  # several nodes in the module: one formula site
            assert detect._FORMULA_CLASSES[cls] == name and detect._activation_module_class(fake, 3) == name
    for cls in spec.modules:
        assert detect._activation_module_class(cls, 1) is not None


def test_no_call_or_module_is_claimed_twice():
    calls = [c for s in SPECS.values() for c in _all_calls(s)]
    modules = [c for s in SPECS.values() for c in s.modules]
    assert len(calls) == len(set(calls)) and len(modules) == len(set(modules))
    accept_all = next(f.default for f in dataclasses.fields(Spec) if f.name == "hf_accepts")
    for cls, names in HF_CLASSES.items():
        if len(names) > 1:  # entries sharing a class must tell its instances apart
            assert all(SPECS[n].hf_accepts is not accept_all for n in names), cls


@pytest.mark.parametrize("name", SUPPORTED)
def test_calls_compute_the_entry_bit_for_bit(name):
    """Each target detect matches, called as a model would, is the entry's forward, and
    detect reads its parameters from the declared argument positions."""
    spec, x = SPECS[name], _x()
    values = [0.5 * v + 0.25 for _, v in spec.params]  # not the defaults: positions matter
    for target, arg_names in spec.functions.items():
        assert set(arg_names) <= set(spec.param_names) | set(spec.variants) | {"inplace"}, target
        positional = values[:len([a for a in arg_names if a in spec.param_names])]
        expected = get(name, **dict(zip(spec.param_names, positional)))
        assert detect.activation_of_call(target, (x, *positional), {}) == (expected, False)
        assert torch.equal(target(x, *positional), expected.forward(x)), target
        if "inplace" in arg_names:
            assert detect.activation_of_call(target, (x,), {"inplace": True}) == (get(name), True)
            xi = x.clone()
            assert torch.equal(target(xi, inplace=True), get(name).forward(x)) and torch.equal(xi, get(name).forward(x))
    for target in spec.inplace_functions:
        xi = x.clone()
        assert detect.activation_of_call(target, (xi,), {}) == (get(name), True)
        target(xi)
        assert torch.equal(xi, get(name).forward(x)), target
    for m in spec.methods:
        assert detect.activation_of_call(m, (x,), {}, method=True) == (get(name), False)
        assert torch.equal(getattr(x, m)(), get(name).forward(x)), m
    for m in spec.inplace_methods:
        xi = x.clone()
        assert detect.activation_of_call(m, (xi,), {}, method=True) == (get(name), True)
        getattr(xi, m)()
        assert torch.equal(xi, get(name).forward(x)), m
    for arg, value, other in _variants_of(name):
        for target in spec.functions:
            assert detect.activation_of_call(target, (x,), {arg: value}) == (get(other), False)
            assert torch.equal(target(x, **{arg: value}), get(other).forward(x))


@pytest.mark.parametrize("name", SUPPORTED)
def test_modules_are_the_entry_with_its_defaults(name):
    """A default-constructed module is the entry with its declared defaults (the defaults
    are torch's), bit for bit; variants via the module's attribute."""
    spec, x = SPECS[name], _x()
    for cls in spec.modules:
        assert from_module(cls()) == get(name), cls
        assert torch.equal(cls()(x), get(name).forward(x))
        for arg, value, other in _variants_of(name):
            assert from_module(cls(**{arg: value})) == get(other)


def _torch_keeps_result(fn, inplace: bool) -> bool:
    """Whether torch's autograd saves fn's output (not its input) for backward."""
    leaf = _x().requires_grad_(True)
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        x = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf
        y = fn(x)
    return any(t.data_ptr() == y.data_ptr() and t.shape == y.shape for t in packed)


def _saves_result(target, kwargs, method=False) -> bool:
    """What passes/saves says the call keeps, on a one-node graph."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.randn(3, requires_grad=True)
    node = (g.call_method if method else g.call_function)(target, (x,), kwargs)
    node.meta["example_value"] = torch.randn(3, requires_grad=True)
    kept, known = saves.saved_inputs(node)
    assert known and kept in ([node], [x])
    return kept == [node]


@pytest.mark.parametrize("name", SUPPORTED)
def test_saves_says_what_torch_keeps(name):
    """saves_result / saves_result_inplace are what torch's backward really keeps, and
    what passes/saves assumes, for every call detect matches."""
    spec = SPECS[name]
    in_place = spec.saves_result or spec.saves_result_inplace
    for target, arg_names in spec.functions.items():
        assert _saves_result(target, {}) == spec.saves_result == _torch_keeps_result(target, False), target
        if "inplace" in arg_names:
            torch_says = _torch_keeps_result(lambda x: target(x, inplace=True), True)
            assert _saves_result(target, {"inplace": True}) == in_place, target
            assert torch_says == in_place, target  # in place: its result, or a copy of x
    for target in spec.inplace_functions:
        assert _saves_result(target, {}) == in_place == _torch_keeps_result(target, True), target
    for m in spec.methods:
        assert _saves_result(m, {}, method=True) == spec.saves_result
        assert _torch_keeps_result(lambda x: getattr(x, m)(), False) == spec.saves_result
    for m in spec.inplace_methods:
        assert _saves_result(m, {}, method=True) == in_place
        assert _torch_keeps_result(lambda x: getattr(x, m)(), True) == in_place


@pytest.mark.parametrize("name", SUPPORTED)
def test_inverse_is_declared(name):
    """One inverse per entry: closed form, a numerical table in fewbit_fx.inverse, or a
    twin that has one of those."""
    from fewbit_fx import inverse

    spec = SPECS[name]
    assert isinstance(spec.inverse, (ClosedForm, Numerical, Twin)), name
    assert (name in inverse.SUPPORTED) == isinstance(spec.inverse, Numerical)
    if isinstance(spec.inverse, Twin):
        assert isinstance(SPECS[spec.inverse.name].inverse, (ClosedForm, Numerical))
        scale = spec.inverse.scale
        assert get(name).twin == (get(spec.inverse.name), get(name).p[scale] if isinstance(scale, str) else scale)
    if isinstance(spec.inverse, Numerical):  # its explicit formulas are the entry's f and f'
        a, x = get(name), torch.linspace(-20, 20, 4001, dtype=torch.float64)
        torch.testing.assert_close(spec.inverse.f(x), a.forward(x), rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(spec.inverse.slope(x), a.derivative(x), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", SUPPORTED)
def test_kernel_tables_follow_the_registry(name):
    """The Triton tables come from the entry's Kernel; each id has its branch (a named
    switch constant in triton_common), and only closed forms run the backward kernel."""
    pytest.importorskip("triton")
    from fewbit_fx.kernels import triton_common

    spec = SPECS[name]
    if spec.kernel is None:
        assert not triton_common.supported_activation(name)
        return
    switches = {v.value for v in vars(triton_common).values()
                if isinstance(v, triton_common.tl.constexpr) and type(v.value) is int}
    assert triton_common.ACT_IDS[name] == spec.kernel.id and spec.kernel.id in switches
    act_id, *scalars = triton_common.kernel_params(get(name))
    assert act_id == spec.kernel.id and len(scalars) == 3 and all(isinstance(s, float) for s in scalars)
    assert (name in triton_common.CLOSED_FORM_BACKWARD) == isinstance(spec.inverse, ClosedForm)
