"""The activation registry (fewbit_fx.activations): lookups, module mapping, and the math
each entry claims (exact forward, derivative, monotonicity, minimum, twins)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fewbit_fx.activations import SUPPORTED, Activation, from_module, get

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
    ],
)
def test_formula_twins_are_mathematically_equal(name, twin, scale):
    a = get(name)
    t, s = a.twin
    assert t == get(twin) and s == scale
    assert not a.exact_from_output
    x = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    # f(x) = twin(s*x)/s (FastGELU's rounded constant differs from sqrt(2/pi) by ~1e-10).
    assert torch.allclose(a.forward(x), t.forward(s * x) / s, rtol=0, atol=1e-8)
    assert torch.allclose(a.derivative(x), t.derivative(s * x), rtol=0, atol=1e-8)


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
