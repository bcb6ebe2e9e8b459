"""fewbit_fx.inverse: f'(x) from y = f(x) against the rounding floor of y's dtype."""
import pytest
import torch

from fewbit_fx.activations import get
from fewbit_fx.inverse import SUPPORTED, derivative_from_output

from fewbit_fx.evidence.inverse_floor import floor_and_error  # evidence code, not the runtime


def value_and_derivative(act, x):
    """(f(x), f'(x)) from the registry's explicit float64 formulas (its Numerical inverse)."""
    numerical = act.spec.inverse
    return numerical.f(x), numerical.slope(x)

N = 10_000  # samples of N(0, 4) (plus sweeps); the report script uses 2e6


def _inputs(act, dtype=torch.float32):
    """x over both tails and the minimum, y = f(x) as torch computes it, the branch mask."""
    x = torch.cat([torch.linspace(-30, 30, 601, dtype=torch.float64),
                   (act.x_min or 0.0) + torch.linspace(-1e-3, 1e-3, 101, dtype=torch.float64)])
    x = x.to(dtype)
    right = None if act.x_min is None else x.double() > act.x_min
    return x, act.forward(x), right


@pytest.mark.parametrize("name", SUPPORTED)
def test_formulas_match_torch(name):
    act = get(name)
    x = torch.linspace(-20, 20, 4001, dtype=torch.float64)
    f, df = value_and_derivative(act, x)
    torch.testing.assert_close(f, act.forward(x), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(df, act.derivative(x), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", SUPPORTED)
def test_float32_within_twice_the_floor(name):
    r = floor_and_error(get(name), torch.float32, n=N)
    assert r["error"] <= 2 * r["floor"] + 1e-5, r
    assert r["error"] <= 1.05 * r["floor"] + 5e-7, r   # in fact: the floor plus fp32 rounding
    assert r["error_far"] <= 5e-7, r


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SUPPORTED)
def test_half_within_the_floor_plus_output_rounding(name, dtype):
    act = get(name)
    r = floor_and_error(act, dtype, n=N)
    # f' <= 1.13 is returned in dtype: rounding it costs up to eps / 2 on top of the floor
    # (tanhshrink's floor is below that; the others' floors are far above it).
    assert r["error"] <= 2 * r["floor"] + torch.finfo(dtype).eps / 2, r
    r32 = floor_and_error(act, dtype, n=N, out_dtype=torch.float32)
    assert r32["error"] <= 1.01 * r32["floor"] + 1e-6, r32


@pytest.mark.parametrize("name", SUPPORTED)
def test_float64(name):
    r = floor_and_error(get(name), torch.float64, n=N)
    assert r["error"] <= 1e-8 and r["error_far"] <= 1e-13, r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SUPPORTED)
def test_extreme_outputs_are_finite_and_right(name, dtype):
    act = get(name)
    if act.x_min is None:
        y = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4, float("inf"), float("-inf")])
        g = derivative_from_output(act, y.to(dtype), None).double()
        assert torch.isfinite(g).all()
        assert (g[:4] < 1e-10).all() and (g[4:] == 1).all()
        return
    y_min = value_and_derivative(act, torch.tensor(act.x_min, dtype=torch.float64))[0].item()
    y = torch.tensor([y_min, y_min, y_min - 1e-3, 0.0, -0.0, -1e-40, 1e4, 1e30, float("inf"),
                      float("-inf"), y_min, -1e-30, float("-inf"), float("inf")], dtype=torch.float64)
    right = torch.tensor([True, False, True, False, False, False, True, True, True,
                          True, False, False, False, False])
    g = derivative_from_output(act, y.to(dtype), right).double()
    assert torch.isfinite(g).all(), g
    # At the minimum f' = 0, up to what rounding y_min to dtype moves: ~0.3 sqrt(eps).
    near_min = torch.finfo(dtype).eps ** 0.5
    assert (g[:3].abs() < near_min).all() and g[9].abs() < near_min  # -inf reads as y_min
    assert (g[3:6].abs() < 1e-30).all()  # y -> 0- on the left: x -> -inf
    assert (g[6:9] == 1).all()           # right tail


@pytest.mark.parametrize("name", SUPPORTED)
def test_shapes(name):
    act = get(name)
    x, y, right = _inputs(act)
    flat = derivative_from_output(act, y, right)
    assert flat.shape == y.shape and flat.dtype == y.dtype

    empty = torch.empty(0, 3)
    r0 = None if right is None else torch.empty(0, 3, dtype=torch.bool)
    assert derivative_from_output(act, empty, r0).shape == (0, 3)

    for i in (0, 300, len(y) - 1):  # 0-d tensors
        ri = None if right is None else right[i]
        assert derivative_from_output(act, y[i], ri).shape == ()
        # scalar and vectorised CPU kernels may differ in the last bit
        torch.testing.assert_close(derivative_from_output(act, y[i], ri), flat[i], rtol=0, atol=1e-6)

    n = len(y) // 2 * 2  # non-contiguous: a transposed view
    yt = y[:n].view(2, -1).t()
    rt = None if right is None else right[:n].view(2, -1).t()
    assert not yt.is_contiguous()
    out = derivative_from_output(act, yt, rt)
    torch.testing.assert_close(out, flat[:n].view(2, -1).t(), rtol=0, atol=1e-6)

    half = derivative_from_output(act, y.half(), right, dtype=torch.float32)
    assert half.dtype == torch.float32


@pytest.mark.parametrize("name", SUPPORTED)
def test_nan_in_nan_out(name):
    act = get(name)
    y = torch.tensor([float("nan"), 0.5, float("nan")])
    right = None if act.x_min is None else torch.tensor([True, True, False])
    g = derivative_from_output(act, y, right)
    assert g.isnan().tolist() == [True, False, True]


def test_errors():
    with pytest.raises(ValueError):
        derivative_from_output(get("gelu"), torch.zeros(3), None)
    with pytest.raises(TypeError):
        derivative_from_output(get("tanh"), torch.zeros(3), None)


@pytest.mark.parametrize("name", SUPPORTED)
def test_traces_without_graph_breaks(name):
    act = get(name)
    x, y, right = _inputs(act)
    torch._dynamo.reset()
    fn = torch.compile(lambda y, r: derivative_from_output(act, y, r), backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(y, right), derivative_from_output(act, y, right), rtol=0, atol=0)


def test_inductor_matches_eager():
    act = get("gelu")
    x, y, right = _inputs(act)
    torch._dynamo.reset()
    fn = torch.compile(lambda y, r: derivative_from_output(act, y, r), fullgraph=True)
    torch.testing.assert_close(fn(y, right), derivative_from_output(act, y, right), rtol=0, atol=1e-6)
