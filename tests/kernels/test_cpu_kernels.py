"""fewbit_fx.kernels.cpu: eager calls on long CPU tensors run Inductor-compiled kernels,
and give what the torch-op path gives (codes and masks bit for bit)."""
from __future__ import annotations

import pytest
import torch

import fewbit_fx.ops  # noqa: F401  (registers the ops)
from fewbit_fx.activations import get
from fewbit_fx.kernels import cpu

N = cpu.MIN_NUMEL + 13  # long enough, and not a multiple of 8
fewbit_forward = torch.ops.fewbit_fx.fewbit_forward
fewbit_backward = torch.ops.fewbit_fx.fewbit_backward
inverted_forward = torch.ops.fewbit_fx.inverted_forward
inverted_backward = torch.ops.fewbit_fx.inverted_backward


def randn(dtype=torch.float32, seed=0, n=N):
    return (3 * torch.randn(n, generator=torch.Generator().manual_seed(seed))).to(dtype)


def both_paths(monkeypatch, call):
    """call() with compiled kernels, then with FEWBIT_FX_CPU_KERNELS=0 (torch ops)."""
    compiled = call()
    monkeypatch.setenv("FEWBIT_FX_CPU_KERNELS", "0")
    torch_ops = call()
    monkeypatch.delenv("FEWBIT_FX_CPU_KERNELS")
    return compiled, torch_ops


def compiled_keys():
    return {k[0] for k, fn in cpu._COMPILED.items() if fn is not None}


@pytest.mark.parametrize("bits, dtype", [(1, torch.float32), (3, torch.bfloat16), (4, torch.float64)])
def test_fewbit_matches_the_torch_path_bit_for_bit(monkeypatch, bits, dtype):
    borders = torch.sort(torch.randn(2**bits - 1, generator=torch.Generator().manual_seed(bits)))[0]
    levels = torch.rand(2**bits, generator=torch.Generator().manual_seed(bits + 1))
    x, g = randn(dtype), randn(dtype, seed=1)
    (y, packed), (y0, packed0) = both_paths(
        monkeypatch, lambda: fewbit_forward(x, "gelu", [], borders, levels, bits))
    assert torch.equal(y, y0) and torch.equal(packed, packed0)
    assert torch.equal(y, torch.nn.functional.gelu(x))  # y is torch's own
    grad, grad0 = both_paths(monkeypatch, lambda: fewbit_backward(g, packed, levels, bits))
    assert torch.equal(grad, grad0)
    assert {"fewbit_codes", "fewbit_backward"} <= compiled_keys()


@pytest.mark.parametrize("name, dtype", [("gelu", torch.float32), ("silu", torch.bfloat16),
                                         ("gelu_tanh_formula", torch.float64), ("tanhshrink", torch.float32)])
def test_inverted_matches_the_torch_path(monkeypatch, name, dtype):
    act = get(name)
    x, g = randn(dtype), randn(dtype, seed=1)
    (y, mask), (y0, mask0) = both_paths(monkeypatch, lambda: inverted_forward(x, name, act.param_list))
    assert torch.equal(y, y0) and torch.equal(mask, mask0)
    grad, grad0 = both_paths(monkeypatch, lambda: inverted_backward(g, y, mask, name, act.param_list))
    # The compiled kernel's log1p/sqrt may differ from ATen's in the last bit.
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(grad, grad0, rtol=tol, atol=tol)
    assert "inverted_backward" in compiled_keys()


def test_non_contiguous_and_two_dimensional(monkeypatch):
    x = randn(n=2 * N).view(2, N).t()  # a transposed view
    g = randn(seed=1, n=2 * N).view(N, 2)
    (y, mask), (y0, mask0) = both_paths(monkeypatch, lambda: inverted_forward(x, "gelu", []))
    assert torch.equal(y, y0) and torch.equal(mask, mask0)
    grad, grad0 = both_paths(monkeypatch, lambda: inverted_backward(g, y, mask, "gelu", []))
    torch.testing.assert_close(grad, grad0, rtol=1e-6, atol=1e-6)


def test_a_failed_compile_warns_once_and_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(cpu, "_COMPILED", {})
    monkeypatch.setattr(cpu, "_failed", [])
    monkeypatch.setattr(torch, "compile", broken)
    x, g = randn(), randn(seed=1)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        y, mask = inverted_forward(x, "silu", [])
    grad = inverted_backward(g, y, mask, "silu", [])  # no second warning
    assert all(fn is None for fn in cpu._COMPILED.values()) and len(cpu._failed) == 2
    monkeypatch.setenv("FEWBIT_FX_CPU_KERNELS", "0")
    torch.testing.assert_close(grad, inverted_backward(g, y, mask, "silu", []), rtol=0, atol=0)


def test_many_kernels_do_not_exhaust_dynamos_recompile_limit(monkeypatch):
    """All keys share one lambda's code object, whose cache Dynamo limits (8 by default;
    lowered to 2 here, so three kernels would exceed it)."""
    monkeypatch.setattr(cpu, "_COMPILED", {})
    monkeypatch.setattr(cpu, "_failed", [])
    # config.patch, not monkeypatch: pytest >= 9.2 restores module attributes with delattr,
    # which hides a torch config entry for good.
    with torch._dynamo.config.patch(recompile_limit=2):
        for name in ["gelu", "silu", "mish"]:
            inverted_forward(randn(), name, [])
    assert cpu._failed == [] and len(cpu._COMPILED) == 3


def test_short_tensors_and_other_switches_use_torch_ops(monkeypatch):
    assert not cpu.usable(torch.zeros(cpu.MIN_NUMEL - 1))
    assert cpu.usable(torch.zeros(cpu.MIN_NUMEL))
    monkeypatch.setenv("FEWBIT_FX_CPU_KERNELS", "0")
    assert not cpu.usable(torch.zeros(cpu.MIN_NUMEL))


NON_FINITE_AT = [0, 17, 40_000, N - 1]  # vectorised body and the scalar tail


@pytest.mark.parametrize("name, dtype", [("gelu", torch.float32), ("sigmoid", torch.bfloat16),
                                         ("relu", torch.float32), ("softsign", torch.float64)])
def test_fewbit_non_finite_inputs_on_long_tensors(monkeypatch, name, dtype):
    # The compiled kernel computes the flag byte with the codes, in the same loop.
    act = get(name)
    borders = torch.sort(torch.randn(7, generator=torch.Generator().manual_seed(3)))[0]
    levels = torch.rand(8, generator=torch.Generator().manual_seed(4))
    x, g = randn(dtype), randn(dtype, seed=1)
    x[NON_FINITE_AT] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")], dtype=dtype)
    (y, packed), (y0, packed0) = both_paths(
        monkeypatch, lambda: fewbit_forward(x, name, [], borders, levels, 3))
    assert torch.equal(packed, packed0) and "fewbit_codes" in compiled_keys()
    bad = act.nan_derivative(x)
    assert int(packed[-1]) == int(bad is not None and bool(bad.any()))

    def grad():
        xr = x.clone().requires_grad_(True)
        fewbit_forward(xr, name, [], borders, levels, 3)[0].backward(g)
        return xr.grad

    out, out0 = both_paths(monkeypatch, grad)
    assert torch.equal(out.isnan(), out0.isnan()) and torch.equal(out.nan_to_num(), out0.nan_to_num())
    expected_nan = torch.zeros_like(x, dtype=torch.bool) if bad is None else bad
    assert torch.equal(out.isnan(), expected_nan)  # exactly there, nowhere else
    dt = torch.promote_types(dtype, torch.float32)
    codes = torch.bucketize(x.to(dt), borders.to(dt))
    keep = ~expected_nan
    assert torch.equal(out[keep], (g.to(dt) * levels.to(dt)[codes]).to(dtype)[keep])
    if bool(packed[-1]):  # the op alone (as compiled graphs run it) knows only the flag
        alone, alone0 = both_paths(monkeypatch, lambda: fewbit_backward(g, packed, levels, 3))
        assert bool(alone.isnan().all()) and bool(alone0.isnan().all())


@pytest.mark.parametrize("name, params", [("gelu", []), ("silu", []), ("hardswish", []),
                                          ("softplus", [-2.0, 1.0])])
def test_inverted_non_finite_inputs_on_long_tensors(monkeypatch, name, params):
    # +inf: NaN for GELU/SiLU (torch's inf * 0); Hardswish: NaN at NaN, 0 at -inf.
    act = get(name, **dict(zip(get(name).spec.param_names, params)))
    x, g = randn(), torch.ones(N)
    x[[0, 1, 2]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    (y, mask), (y0, mask0) = both_paths(monkeypatch, lambda: inverted_forward(x, name, params))
    assert torch.equal(mask, mask0)
    grad, grad0 = both_paths(monkeypatch, lambda: inverted_backward(g, y, mask, name, params))
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(act.forward(xr), xr, g)
    for out in (grad, grad0):
        assert torch.equal(out[:3].isnan(), expected[:3].isnan()), (out[:3], expected[:3])
        assert torch.equal(out[:3].nan_to_num(), expected[:3].nan_to_num())
