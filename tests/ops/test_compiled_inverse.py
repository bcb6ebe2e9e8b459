"""Inverted under torch.compile (Inductor, CPU): f'(x) against the rounding floor of y's
dtype, as tests/test_inverse.py holds the eager inverse to it.

Here the whole step is compiled: Inductor's forward computes y from x, the op's backward
decomposition recovers f'(x) from that y. So the forward's rounding of y counts too (the
eager test feeds the inverse a correctly rounded y): near the minimum of GELU, SiLU, Mish,
where f' ~ sqrt(y - y_min), a y a few ulps off costs several times the floor (Inductor's
fp32 GELU gave 3.0e-4 against a floor of 4.8e-5; the GELU family's fp32 forward is now
fewbit_fx.ops.forward32's, rounded to within 0.55 ulp at the minimum).

Samples and floor: fewbit_fx.evidence.inverse_floor (the eager tests' helper); grad = 1,
so x.grad is f'(x) rounded to x's dtype. One compiled module per activation, one graph
per dtype (dynamic=False).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fewbit_fx.activations import SUPPORTED, get
from fewbit_fx.evidence.inverse_floor import _reference, gradient_floor_and_error
from fewbit_fx.inverse import SUPPORTED as NUMERICAL
from fewbit_fx.ops.forward32 import MINIMA
from fewbit_fx.ops.inverted import FLOAT64_FORWARD, compiled_output
from fewbit_fx.nn import Inverted

N = 10_000  # as tests/test_inverse.py
HALF = [torch.float16, torch.bfloat16]
# Formula twins: the backward inverts the twin (quick_gelu: silu at 1.702 x), the forward
# is the Hugging Face formula Inductor compiles.
TWINS = ["gelu_erf_formula", "gelu_tanh_formula", "mish_formula", "quick_gelu", "swish"]
CLOSED = ["sigmoid", "tanh", "softplus", "elu", "hardswish", "logsigmoid", "softsign"]


@functools.lru_cache(maxsize=None)
def _compiled(name: str):
    return torch.compile(Inverted(get(name)), dynamic=False, fullgraph=True)


def _result(name: str, dtype: torch.dtype) -> dict:
    module = _compiled(name)

    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        module(x).backward(torch.ones_like(x))
        return x.grad

    return gradient_floor_and_error(get(name), dtype, gradient, n=N)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    # Every module's forward is Inverted.forward: one code object, a graph per activation
    # and dtype (Dynamo's default limit is 8 per code object).
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    _compiled.cache_clear()
    torch._dynamo.reset()


def _base(name: str) -> str:
    a = get(name)
    return a.twin[0].name if a.twin is not None else name


# GELU (both forms), Mish and their formula twins: forward32's y at the minimum.
FORWARD32 = [n for n in [*NUMERICAL, *TWINS] if _base(n) in MINIMA]


@pytest.mark.parametrize("name", [*NUMERICAL, *TWINS, *CLOSED])
def test_float32_within_twice_the_floor(name):
    r = _result(name, torch.float32)
    assert r["error"] <= 2 * r["floor"] + 1e-5, r
    if name in FLOAT64_FORWARD or name in FORWARD32:  # y (nearly) correctly rounded at the
        assert r["error"] <= 1.05 * r["floor"] + 5e-7, r  # minimum: the floor plus fp32 rounding
    if name in NUMERICAL:  # away from the minimum: a few fp32 roundings (Inductor's SiLU: 6e-7)
        assert r["error_far"] <= (5e-7 if name in FLOAT64_FORWARD else 1e-6), r


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("name", [*NUMERICAL, "quick_gelu", "hardswish"])
def test_half_within_the_floor_plus_output_rounding(name, dtype):
    # x.grad is f' rounded to dtype: up to eps / 2 on top of the floor (as the eager test).
    r = _result(name, dtype)
    assert r["error"] <= 2 * r["floor"] + torch.finfo(dtype).eps / 2, r
    if name != "tanhshrink":  # its floor is below eps / 2; the others' far above it
        assert r["error"] <= 1.05 * r["floor"], r


def test_every_activation_with_a_numerical_inverse_is_covered():
    inverted = {n for n in SUPPORTED if not get(n).exact_from_output}
    twins = {n for n in inverted if get(n).twin is not None}
    assert inverted - twins == set(NUMERICAL)
    # The twins left out compile the same twin's inverse as one of TWINS (the gelu_tanh
    # spellings differ from gelu_tanh_formula only in how they write the tanh argument).
    assert {get(n).twin[0].name for n in twins} == {get(n).twin[0].name for n in TWINS}


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "gelu_erf_formula", "mish"])
def test_float64_forward_reaches_the_floor(name, monkeypatch):
    from fewbit_fx.ops import inverted

    monkeypatch.setattr(inverted, "FLOAT64_FORWARD", ("gelu", "gelu_tanh", "mish"))
    torch._dynamo.reset()  # a fresh trace: the decomposition reads the setting then
    # and no cached kernel: the caches' keys do not include the setting
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._functorch.config, "enable_autograd_cache", False)
    module = torch.compile(Inverted(get(name)), dynamic=False, fullgraph=True)

    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        module(x).backward(torch.ones_like(x))
        return x.grad

    r = gradient_floor_and_error(get(name), torch.float32, gradient, n=N)
    assert r["error"] <= 1.05 * r["floor"] + 5e-7, r
    torch._dynamo.reset()
    _compiled.cache_clear()


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh"])
def test_in_place_variant_too(name):
    # Inverted(inplace=True) is an autograd.Function around the pieces, not the custom op;
    # its compiled y is compiled_output's too, traced by Dynamo (forward32's for GELU).
    # (Not fullgraph: Dynamo traces into the lazy x_min bisection of the branch mask.)
    torch._dynamo.reset()
    module = torch.compile(Inverted(get(name), inplace=True), dynamic=False)

    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.clone().requires_grad_(True)
        module(x * 1.0).backward(torch.ones_like(x))  # in place needs a non-leaf input
        return x.grad

    r = gradient_floor_and_error(get(name), torch.float32, gradient, n=N)
    assert r["error"] <= 1.05 * r["floor"] + 5e-7, r


def _ulps(y: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """|y - exact| in units of the float32 spacing at exact (2^-149 below the normals)."""
    r = exact.float().abs()
    spacing = (torch.nextafter(r, torch.full_like(r, float("inf"))) - r).double()
    return (y.double() - exact).abs() / spacing


@pytest.mark.parametrize("name", FORWARD32)
def test_forward32_rounding(name):
    # forward32's y against the float64 formula, on the floor samples and a dense sweep of
    # the window at the minimum: within 0.55 ulp there (measured 0.544 erf GELU, 0.541 tanh
    # GELU, 0.516 Mish: the rounding of y0 + P(h) plus < 0.05 ulp; Inductor's own forward:
    # 8.8, 2.5, 1.9); outside it erf GELU and Mish are Inductor's own forward bit for bit,
    # tanh GELU within 4.5 ulps on [-8, 8] (3.9 measured; Inductor's: 203) and 12 in the
    # tail down to the underflow (10.8).
    a, base = get(name), _base(name)
    m = MINIMA[base]
    samples = _reference(name, torch.float32, N, 0)[0].float()
    sweep = m.x0 + torch.linspace(-m.half_width, m.half_width, 200_001)
    x = torch.cat([samples, sweep, torch.linspace(-8.0, 8.0, 100_001),
                   torch.linspace(-14.0, -8.0, 10_001)])
    y = torch.compile(lambda x: compiled_output(a, x), dynamic=False, fullgraph=True)(x)
    ulps = _ulps(y, get(base).spec.inverse.f(x.double()))
    window = (x - m.x0).abs() < m.half_width
    assert window.sum() > 200_000 and ulps[window].max() <= 0.55, ulps[window].max()
    if base != "gelu_tanh":  # erf GELU, Mish: Inductor's forward outside the window
        inductor = torch.compile(lambda x: a.forward(x), dynamic=False, fullgraph=True)(x)
        assert torch.equal(y[~window], inductor[~window])
    else:
        assert ulps[~window & (x.abs() <= 8.0)].max() <= 4.5, ulps[~window & (x.abs() <= 8.0)].max()
        assert ulps.max() <= 12.0, ulps.max()
    # Half x: torch's forward as before (Inductor computes it in float32, rounds once).
    for dtype in HALF:
        assert torch.equal(compiled_output(a, x.to(dtype)), a.forward(x.to(dtype)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: Triton's kernels")
@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "gelu_tanh_formula", "mish", "silu"])
def test_float32_within_twice_the_floor_on_cuda(name):
    # forward32's error-free steps assume no FMA contraction (Inductor's C++ has none);
    # Triton contracts by default, so the floor is checked there separately.
    module = torch.compile(Inverted(get(name)), dynamic=False, fullgraph=True)

    def gradient(x: torch.Tensor) -> torch.Tensor:
        x = x.cuda().requires_grad_(True)
        module(x).backward(torch.ones_like(x))
        return x.grad.cpu()

    r = gradient_floor_and_error(get(name), torch.float32, gradient, n=N)
    assert r["error"] <= 2 * r["floor"] + 1e-5, r
