"""The custom ops fewbit_fx::fewbit_forward / fewbit_backward, called directly.

The ops take the table (borders, levels) as arguments, so these tests use small random
tables and need no table fitting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fewbit_fx.ops  # noqa: F401  (registers the ops)
from fewbit_fx.activations import SUPPORTED, get
from fewbit_fx.packing import unpack

fewbit_forward = torch.ops.fewbit_fx.fewbit_forward
fewbit_backward = torch.ops.fewbit_fx.fewbit_backward

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def random_table(bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    borders = torch.sort(torch.randn(2**bits - 1, generator=g) * 2).values
    levels = torch.randn(2**bits, generator=g)
    return borders, levels


def random_x(n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)


def expected_codes(x: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    dt = torch.promote_types(x.dtype, torch.float32)
    return torch.bucketize(x.to(dt), borders.to(dt))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", range(1, 9))
def test_forward_returns_exact_y_and_packed_codes(bits, dtype):
    borders, levels = random_table(bits)
    n = 1000 + bits  # not a multiple of 8 for most bits
    x = random_x(n, dtype)
    y, packed = fewbit_forward(x, "gelu", [], borders, levels, bits)
    assert torch.equal(y, F.gelu(x))
    assert packed.dtype == torch.uint8
    assert packed.shape == (math.ceil(n * bits / 8) + 1,)  # the codes, then the flag byte
    assert packed[-1] == 0  # no non-finite input
    assert torch.equal(unpack(packed, bits, n).long(), expected_codes(x, borders))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_backward_multiplies_by_the_level(bits, dtype):
    borders, levels = random_table(bits, seed=2)
    x = random_x(333, dtype).view(9, 37)
    _, packed = fewbit_forward(x, "silu", [], borders, levels, bits)
    grad = random_x(333, dtype, seed=3).view(9, 37)
    out = fewbit_backward(grad, packed, levels, bits)
    dt = torch.promote_types(dtype, torch.float32)
    expected = (grad.to(dt) * levels.to(dt)[expected_codes(x, borders)]).to(dtype)
    assert out.dtype == dtype and out.shape == grad.shape
    assert torch.equal(out, expected)


def test_parameters_reach_the_forward():
    borders, levels = random_table(2)
    x = random_x(500, torch.float32)
    for act, ref in [
        (get("leaky_relu", negative_slope=0.2), F.leaky_relu(x, 0.2)),
        (get("hardtanh", min_val=-2.0, max_val=3.0), F.hardtanh(x, -2.0, 3.0)),
        (get("softplus", beta=2.0, threshold=5.0), F.softplus(x, 2.0, 5.0)),
        (get("elu", alpha=0.7), F.elu(x, 0.7)),
    ]:
        y, _ = fewbit_forward(x, act.name, act.param_list, borders, levels, 2)
        assert torch.equal(y, ref), act


def test_points_on_a_border_go_left():
    borders = torch.tensor([-1.0, 0.0, 1.0])
    levels = torch.tensor([10.0, 20.0, 30.0, 40.0])
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    _, packed = fewbit_forward(x, "relu", [], borders, levels, 2)
    assert unpack(packed, 2, 6).tolist() == [0, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_uses_the_backward_op(dtype):
    borders, levels = random_table(3, seed=4)
    x = random_x(100, dtype).requires_grad_(True)
    y, packed = fewbit_forward(x, "gelu", [], borders, levels, 3)
    assert y.requires_grad and not packed.requires_grad
    g = random_x(100, dtype, seed=5)
    y.backward(g)
    assert torch.equal(x.grad, fewbit_backward(g, packed, levels, 3))


def test_noncontiguous_upstream_gradient():
    borders, levels = random_table(3, seed=6)
    x = random_x(40, torch.float32).view(5, 8).requires_grad_(True)
    y, packed = fewbit_forward(x, "gelu", [], borders, levels, 3)
    g = random_x(40, torch.float32, seed=7).view(8, 5).t()  # non-contiguous
    y.backward(g)
    assert torch.equal(x.grad, fewbit_backward(g.contiguous(), packed, levels, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_a_type_error(dtype):
    borders, levels = random_table(2)
    with pytest.raises(TypeError, match="floating-point"):
        fewbit_forward(torch.arange(8).to(dtype), "relu", [], borders, levels, 2)


def test_double_backward_is_refused():
    borders, levels = random_table(2)
    x = random_x(16, torch.float32).requires_grad_(True)
    y, _ = fewbit_forward(x, "gelu", [], borders, levels, 2)
    v = torch.ones(16, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, x, v, create_graph=True)


def test_opcheck_forward():
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch.
    borders, levels = random_table(3)
    x = random_x(37, torch.float32).requires_grad_(True)
    torch.library.opcheck(fewbit_forward.default, (x, "gelu", [], borders, levels, 3))


def test_opcheck_backward():
    borders, levels = random_table(3)
    x = random_x(37, torch.float32)
    _, packed = fewbit_forward(x, "gelu", [], borders, levels, 3)
    torch.library.opcheck(fewbit_backward.default, (random_x(37, torch.float32, 8), packed, levels, 3))


# --- non-finite inputs ---------------------------------------------------------------------
# torch's gradient at NaN, +inf, -inf, where its vectorised loop runs (the start of a long
# tensor: there ELU and Hardswish give NaN at NaN; their scalar tail loop a number).
NON_FINITE = [math.nan, math.inf, -math.inf]
AT = [0, 9, 16]  # where the non-finite values go in a tensor of random ones


def _torch_grad(act, x):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act.forward(xr), xr, torch.ones_like(x))
    return g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("name", SUPPORTED)
def test_non_finite_inputs_give_nan_exactly_where_torch_does(name, dtype):
    # The codes cannot say NaN (all 2^b are intervals): the gradient used to be the last
    # level at NaN (and at +-inf for GELU, SiLU, Mish, Softsign), where torch's is NaN.
    act = get(name)
    borders, levels = random_table(3, seed=8)
    x = random_x(67, dtype)
    g = random_x(67, dtype, seed=9)
    dt = torch.promote_types(dtype, torch.float32)
    for value in NON_FINITE:
        xs = x.clone()
        xs[AT] = value
        xr = xs.clone().requires_grad_(True)
        y, packed = fewbit_forward(xr, name, act.param_list, borders, levels, 3)
        y.backward(g)
        nan = _torch_grad(act, xs).isnan()
        assert bool(packed[-1]) == bool(nan.any())  # the flag byte after the codes
        assert torch.equal(xr.grad.isnan(), nan), (value, xr.grad[AT])
        expected = (g.to(dt) * levels.to(dt)[expected_codes(xs, borders)]).to(dtype)
        assert torch.equal(xr.grad[~nan], expected[~nan])  # the others: g * levels[code]


def test_nan_derivative_matches_torch_for_every_activation():
    # Activation.nan_derivative is a table: check it against torch's autograd, with
    # parameters of both signs, at the start of a long tensor (torch's vectorised loop).
    cases = [get(n) for n in SUPPORTED] + [
        get("softplus", beta=-1.5, threshold=2.0), get("leaky_relu", negative_slope=-0.3),
        get("elu", alpha=0.5), get("celu", alpha=2.0), get("hardtanh", min_val=-0.7, max_val=0.3),
    ]
    x = torch.cat([torch.tensor(NON_FINITE), torch.zeros(61)])
    for act in cases:
        expected = _torch_grad(act, x)[:3].isnan()
        got = act.nan_derivative(x[:3])
        assert torch.equal(torch.zeros(3, dtype=torch.bool) if got is None else got, expected), act


def test_without_the_autograd_wrapper_a_flagged_backward_is_all_nan():
    # Called directly (as compiled graphs and CUDA do, where finding the elements would
    # cost a sync or cannot be traced), the flag alone makes every gradient NaN.
    borders, levels = random_table(2)
    x = random_x(40, torch.float32)
    x[5] = math.nan
    _, packed = fewbit_forward(x, "gelu", [], borders, levels, 2)
    assert bool(fewbit_backward(torch.ones(40), packed, levels, 2).isnan().all())
    x[5] = 0.0
    _, packed = fewbit_forward(x, "gelu", [], borders, levels, 2)
    assert not bool(fewbit_backward(torch.ones(40), packed, levels, 2).isnan().any())
