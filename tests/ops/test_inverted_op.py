"""The custom ops fewbit_fx::inverted_forward / inverted_backward, called directly:
the saved branch mask, f'(x) recovered from y on the right branch, and op registration."""
from __future__ import annotations

import math

import pytest
import torch

import fewbit_fx.ops  # noqa: F401  (registers the ops)
from fewbit_fx.activations import SUPPORTED, get
from fewbit_fx.nn import Inverted
from fewbit_fx.packing import unpack

inverted_forward = torch.ops.fewbit_fx.inverted_forward
inverted_backward = torch.ops.fewbit_fx.inverted_backward

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NON_MONOTONE = [n for n in SUPPORTED if not get(n).monotone]
MONOTONE = [n for n in SUPPORTED if get(n).monotone]


def random_x(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 3.0):
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            * scale).to(dtype)


def away_from_kinks(x: torch.Tensor, name: str) -> torch.Tensor:
    for k in get(name).kinks:
        x = x[(x.double() - k).abs() > 1e-3]
    return x


def reference_derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    return get(name).derivative(x.double())


def test_monotone_split():
    assert set(NON_MONOTONE) == {
        "gelu", "gelu_tanh", "silu", "mish", "hardswish",
        "gelu_tanh_formula", "gelu_fast_formula", "gelu_erf_formula", "quick_gelu",
        "swish", "mish_formula", "gelu_tanh_pow_formula", "gelu_tanh_cube_formula",
        "gelu_tanh_fast_formula",
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", NON_MONOTONE)
def test_forward_saves_the_branch_mask(name, dtype):
    a = get(name)
    x = random_x(1001, dtype)
    y, mask = inverted_forward(x, a.name, a.param_list)
    assert torch.equal(y, a.forward(x))
    assert mask.dtype == torch.uint8 and mask.shape == (math.ceil(1001 / 8),)
    right = x.to(torch.promote_types(dtype, torch.float32)) > a.x_min
    assert torch.equal(unpack(mask, 1, 1001).bool(), right)


@pytest.mark.parametrize("name", MONOTONE)
def test_forward_saves_no_mask_for_monotone(name):
    a = get(name)
    x = random_x(100)
    y, mask = inverted_forward(x, a.name, a.param_list)
    assert torch.equal(y, a.forward(x))
    assert mask.dtype == torch.uint8 and mask.numel() == 0


def _op_grad(name: str, x: torch.Tensor, grad: torch.Tensor, **params) -> torch.Tensor:
    a = get(name, **params)
    y, mask = inverted_forward(x, a.name, a.param_list)
    return inverted_backward(grad, y, mask, a.name, a.param_list)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "relu", "relu6", "hardtanh", "leaky_relu"])
def test_backward_is_torchs_own_kernel(name):
    x = away_from_kinks(random_x(5000, seed=1), name)
    g = random_x(x.numel(), seed=2, scale=1.0)
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(get(name).forward(xr), xr, g)
    assert torch.equal(_op_grad(name, x, g), expected)


@pytest.mark.parametrize("name", sorted(set(SUPPORTED) - {"softplus"}))
def test_backward_fp32_close_to_float64_derivative(name):
    # Default parameters; softplus has its own test (its threshold is a discontinuity of f).
    x = away_from_kinks(random_x(5000, seed=3), name)
    out = _op_grad(name, x, torch.ones_like(x))
    err = (out.double() - reference_derivative(name, x)).abs().max()
    tol = 1e-6 if get(name).exact_from_output and name != "hardswish" else 2e-4
    assert float(err) <= tol


@pytest.mark.parametrize("name", ["gelu", "silu", "mish", "gelu_tanh", "tanhshrink", "quick_gelu"])
def test_backward_tails(name):
    # Far tails: y -> 0- on the left (f' -> 0), y ~ x on the right (f' -> 1).
    x = torch.cat([torch.linspace(-60, -6, 500), torch.linspace(6, 1e3, 500)])
    out = _op_grad(name, x, torch.ones_like(x))
    assert bool(torch.isfinite(out).all())
    assert float((out.double() - reference_derivative(name, x)).abs().max()) <= 2e-4


@pytest.mark.parametrize("name", ["gelu", "silu", "mish", "hardswish", "quick_gelu"])
def test_the_mask_picks_the_branch(name):
    # Same y, two preimages: the mask alone decides which derivative comes back.
    a = get(name)
    x_left = torch.tensor([-2.5, -2.0, -1.6], dtype=torch.float64)
    if name == "gelu":
        x_left = torch.tensor([-2.0, -1.5, -1.2], dtype=torch.float64)
    y = a.forward(x_left)
    lo = torch.full_like(y, a.x_min)
    hi = torch.zeros_like(y)
    for _ in range(100):  # bisection for the right-branch preimage in (x_min, 0)
        mid = 0.5 * (lo + hi)
        below = a.forward(mid) < y
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    x_right = 0.5 * (lo + hi)
    ones = torch.ones_like(y)
    for right, xs in ((torch.zeros(3, dtype=torch.bool), x_left), (torch.ones(3, dtype=torch.bool), x_right)):
        from fewbit_fx.packing import pack

        out = inverted_backward(ones, y, pack(right, 1), a.name, a.param_list)
        assert torch.allclose(out, a.derivative(xs), rtol=0, atol=1e-6), (name, right[0])


def test_hardswish_flat_and_linear_parts():
    x = torch.tensor([-7.0, -3.5, 3.5, 8.0])
    assert _op_grad("hardswish", x, torch.ones(4)).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_softplus_gradient_across_its_threshold():
    # torch's softplus is linear where beta*x > threshold; below it, the derivative is
    # sigmoid(beta*x). y alone cannot tell the sides apart in the band
    # (threshold - log1p(exp(-threshold)), threshold) / beta, where f jumps down by
    # log1p(exp(-threshold)) / beta at the threshold; the gradient must still be right there.
    # A mask bit (torch's own test beta*x > threshold) tells the sides apart.
    a = get("softplus", beta=2.0, threshold=5.0)
    x = torch.tensor([2.49, 2.4966, 2.498, 2.499, 2.501, 2.51])
    out = inverted_backward(torch.ones(6), *inverted_forward(x, a.name, a.param_list), a.name, a.param_list)
    assert torch.allclose(out.double(), a.derivative(x.double()), rtol=0, atol=1e-6), out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", ["gelu", "sigmoid", "elu", "softsign"])
def test_backward_keeps_the_grad_dtype(name, dtype):
    x = random_x(64, dtype)
    assert _op_grad(name, x, torch.ones_like(x)).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        inverted_forward(torch.arange(8).to(dtype), "relu", [])


@pytest.mark.parametrize("name", ["gelu", "sigmoid"])
def test_double_backward_is_refused(name):
    x = random_x(16).requires_grad_(True)
    y, _ = inverted_forward(x, name, [])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


@pytest.mark.parametrize("name, params", [("sigmoid", []), ("leaky_relu", [0.2]), ("hardswish", []), ("gelu", [])])
def test_opcheck_forward(name, params):
    # Schema, fake (meta) implementation, autograd registration and AOT dispatch; the
    # AOT check traces the backward too, so this also covers inverted_backward's fake.
    x = away_from_kinks(random_x(37), name).requires_grad_(True)
    torch.library.opcheck(inverted_forward.default, (x, name, params))


@pytest.mark.parametrize("name", ["sigmoid", "hardswish", "silu"])
def test_opcheck_backward(name):
    x = away_from_kinks(random_x(37), name)
    y, mask = inverted_forward(x, name, [])
    torch.library.opcheck(inverted_backward.default, (random_x(x.numel(), seed=9), y, mask, name, []))


def _torch_grad(a, x, grad=None):
    """torch's own autograd gradient of the activation at x."""
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(a.forward(xr), xr, torch.ones_like(x) if grad is None else grad)
    return g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta, threshold", [(-2.0, 1.0), (-0.5, 0.3), (2.0, 1.0), (1.3, 5.0), (-1.3, 5.0)])
def test_softplus_mask_is_torchs_linear_side(beta, threshold, dtype):
    # For beta < 0 torch's linear side beta*x > threshold is x < threshold/beta; the mask
    # once read x > threshold/beta there (gradient [1, .998, .982, ...] for torch's
    # [1, 1, 1, 1, .5, .119, ...]). And at the boundary the bit must be torch's own
    # fp32 product beta*x against threshold, not x against fp32(threshold/beta): for
    # beta = 1.3, threshold = 5, x = 3.846154 the latter was off by 0.0067.
    a = get("softplus", beta=beta, threshold=threshold)
    assert a.needs_mask
    edge = torch.tensor(threshold / beta, dtype=dtype)
    near = torch.stack([edge, torch.nextafter(edge, edge + 1), torch.nextafter(edge, edge - 1)])
    if dtype in (torch.float16, torch.bfloat16):  # nextafter rounds to the dtype's own grid
        near = torch.cat([near, (edge.float() + torch.tensor([-2e-3, 2e-3])).to(dtype)])
    x = torch.cat([torch.linspace(-4, 4, 9, dtype=dtype), near, torch.tensor([3.846154], dtype=dtype)])
    out = _op_grad("softplus", x, torch.ones_like(x), beta=beta, threshold=threshold)
    expected = _torch_grad(a, x)
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    linear = (x.to(torch.promote_types(dtype, torch.float32)) * beta) > threshold
    assert torch.equal(out[linear], torch.ones_like(out[linear]))  # exactly torch's linear side


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lo, hi", [(-0.7, 0.3), (-1.0, 1.0), (-0.3, 0.7), (0.1, 0.2), (-2.0, 3.0),
                                    (-0.33, 0.33)])
def test_hardtanh_half_gradient_is_torchs_for_every_input(lo, hi, dtype):
    # bf16(-0.7) = -0.69921875 > -0.7: torch clamps to it, but its backward compares the
    # input against fp32(-0.7), so x = -0.69921875 (gradient 1) and x = -1 (gradient 0)
    # give the same y. The 1-bit mask (torch's own "strictly inside" test) is kept then.
    a = get("hardtanh", min_val=lo, max_val=hi)
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    x = patterns[patterns.isfinite() & (patterns.abs() < 4)]  # every value near the bounds
    y, mask = inverted_forward(x, a.name, a.param_list)
    assert torch.equal(y, a.forward(x))
    ends = a.forward(torch.tensor([-math.inf, math.inf], dtype=dtype)).float()
    inward = bool(ends[0] > torch.tensor(lo)) or bool(ends[1] < torch.tensor(hi))
    assert (mask.numel() > 0) == inward  # the bit costs only where it is needed
    g = random_x(x.numel(), dtype, seed=4)
    assert torch.equal(inverted_backward(g, y, mask, a.name, a.param_list), _torch_grad(a, x, g))


def test_hardtanh_keeps_no_mask_where_its_bounds_are_exact():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        assert not get("hardtanh", min_val=-1.0, max_val=1.0).saves_mask(dtype)
    assert not get("hardtanh", min_val=-0.7, max_val=0.3).saves_mask(torch.float32)
    assert get("hardtanh", min_val=-0.7, max_val=0.3).saves_mask(torch.bfloat16)


def _all_half_values(dtype: torch.dtype) -> torch.Tensor:
    patterns = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype)
    return patterns[patterns.isfinite()]


@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, 6.1e-3), (torch.float16, 9.2e-4)], ids=str)
def test_tanhshrink_half_models_the_eager_forward(dtype, bound):
    # torch's eager half tanhshrink is x - tanh(x) with tanh(x) rounded to the dtype first
    # (bf16: y = 0 for every |x| < 0.09). Inverting the single-rounded f misread that by up
    # to 8.0e-3 (bf16) and 1.3e-3 (fp16). The bound is what y alone allows: over all x
    # giving the same y, f' spans up to twice it (6.07e-3 bf16, 9.17e-4 fp16).
    x = _all_half_values(dtype).repeat(2)  # twice: past the chunk size, the chunked path too
    y, mask = inverted_forward(x, "tanhshrink", [])
    assert torch.equal(y, torch.nn.functional.tanhshrink(x))
    out = inverted_backward(torch.ones_like(x, dtype=torch.float32), y, mask, "tanhshrink", [])
    err = (out.double() - torch.tanh(x.double()) ** 2).abs()
    assert float(err.max()) <= bound
    small = inverted_backward(torch.ones(2000), y[:2000], mask, "tanhshrink", [])  # unchunked
    assert torch.equal(small, out[:2000])


def test_tanhshrink_half_under_inductor_models_its_single_rounding():
    # Inductor computes half tanhshrink in fp32 and rounds once; the compiled backward
    # assumes that forward (and is then as good as torch's own compiled gradient).
    x = _all_half_values(torch.bfloat16)
    exact = torch.tanh(x.double()) ** 2
    grads = []
    for module in (torch.nn.Tanhshrink(), Inverted(torch.nn.Tanhshrink())):
        xr = x.clone().requires_grad_(True)
        torch.compile(module)(xr).backward(torch.ones_like(x))
        grads.append(float((xr.grad.double() - exact).abs().max()))
    torch_err, ours = grads
    assert ours <= torch_err + 1e-6, grads


# torch's gradient at NaN, +inf, -inf; taken where its vectorised loop runs (the start
# of a long tensor): there ELU and Hardswish give NaN at NaN, their scalar tail a number.
NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SUPPORTED)
def test_non_finite_inputs_give_torchs_gradient(name, dtype):
    # Inverted GELU/SiLU/Mish gave 1 at +inf (torch: NaN), Hardswish NaN at -inf (torch: 0).
    a = get(name)
    if name in ("elu", "celu") and not a.monotone:
        pytest.skip("not invertible")
    x = torch.cat([torch.tensor(NON_FINITE * 3), random_x(61)]).to(dtype)
    out = _op_grad(name, x, torch.ones_like(x))[:9]
    expected = _torch_grad(a, x)[:9]
    assert torch.equal(out.isnan(), expected.isnan()), (out, expected)
    finite = ~expected.isnan()
    # bf16 SELU at -inf: y is the rounded saturation value, f' = 2.9e-4 (its floor).
    atol = 1e-3 if dtype == torch.bfloat16 else 0
    torch.testing.assert_close(out[finite], expected[finite], rtol=0, atol=atol)
