"""The Triton kernels against the ops' torch implementations.

On CPU tensors the kernels run in Triton's interpreter, which needs TRITON_INTERPRET=1
before the kernels are defined, and which would also turn every other Triton kernel of
the process into interpreted code. So the CPU cases run in a child pytest process with
that variable set (test_interpreter_subprocess); in this process they are skipped unless
the variable was already set. With CUDA, the CUDA cases run here on compiled kernels.

Codes, masks and few-bit gradients must match byte for byte; y and inverted gradients
within a few units of rounding of the values involved (1 on CUDA, where the reference is
torch's own CUDA kernel; 4 on CPU, where torch's CPU kernels use other math libraries).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from fewbit_fx.activations import SUPPORTED, get  # noqa: E402
from fewbit_fx.kernels import triton_common, triton_fewbit, triton_inverted  # noqa: E402
from fewbit_fx.ops import fewbit as ref_fewbit  # noqa: E402
from fewbit_fx.ops import inverted as ref_inverted  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = triton_common.INTERPRET
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        not INTERPRETED, reason="runs under TRITON_INTERPRET=1 in test_interpreter_subprocess")),
    pytest.param("cuda", marks=pytest.mark.skipif(
        not HAS_CUDA or INTERPRETED, reason="needs CUDA and compiled kernels")),
]
DTYPES = [torch.float32, torch.bfloat16]
BITS = range(1, 9)
SIZES = [1, 7, 1000, 4099]


def _ulps(device: str) -> int:
    return 1 if device == "cuda" else 4


def assert_close_scaled(actual, expected, scale, ulps: int):
    """|actual - expected| <= ulps * eps * (|expected| + |scale|), NaN/inf equal.

    `scale` is the magnitude the formula cancels down from (x for f(x), grad for f'*grad),
    so e.g. gelu's 1 + erf(z) near x = -5 is judged at the scale of x, not of y.
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e, s = actual.double(), expected.double(), scale.double()
    eps = torch.finfo(expected.dtype).eps
    tol = ulps * eps * (e.abs() + s.abs()) + 1e-30
    same = (a == e) | (a.isnan() & e.isnan())
    bad = ~same & ~((a - e).abs() <= tol)
    assert not bad.any(), (
        f"{int(bad.sum())} of {a.numel()} beyond {ulps} ulp(s); first: actual "
        f"{a[bad][:4].tolist()} expected {e[bad][:4].tolist()} scale {s[bad][:4].tolist()}"
    )


def _inputs(n: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """Values spread over the interesting range of every activation, plus exact kinks and
    branch points (every 17th element)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    special = torch.tensor([0.0, -3.0, 3.0, 6.0, -1.0, 1.0, 20.0, -20.0, -1.5, 2.5, -0.5, 2.0])
    x[::17] = special.repeat(n)[: x[::17].numel()]
    return x.to(dtype).to(device)


def _table(bits: int, device, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    borders = torch.sort(torch.randn((1 << bits) - 1, generator=g) * 2).values
    levels = torch.randn(1 << bits, generator=g)
    return borders.to(device), levels.to(device)


def _act_cases():
    cases = [get(name) for name in SUPPORTED]
    # parameters that change the code path: non-monotone leaky_relu, softplus with a small
    # threshold (needs a mask), other alphas and ranges
    cases += [get("leaky_relu", negative_slope=-0.2), get("elu", alpha=0.5), get("celu", alpha=2.0),
              get("softplus", beta=2.0, threshold=5.0), get("hardtanh", min_val=-0.5, max_val=2.0),
              # beta < 0: the mask is torch's beta*x > threshold, the other side of the jump;
              # bounds that bf16 rounds inward need a mask in half precision
              get("softplus", beta=-2.0, threshold=1.0), get("hardtanh", min_val=-0.7, max_val=0.3)]
    return cases


# --- forward: every activation, both ops ------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=str)
@pytest.mark.parametrize("act", _act_cases(), ids=str)
def test_forward_matches_torch(device, dtype, act):
    x = _inputs(1000, dtype, device)
    borders, levels = _table(3, device)
    y, packed = triton_fewbit.fewbit_forward(x, act.name, act.param_list, borders, levels, 3)
    y_ref, packed_ref = ref_fewbit._forward(x, act.name, act.param_list, borders, 3)
    assert torch.equal(packed, packed_ref)
    assert_close_scaled(y, y_ref, x, _ulps(device))

    y_inv, mask = triton_inverted.inverted_forward(x, act.name, act.param_list)
    _, mask_ref = ref_inverted._forward(x, act.name, act.param_list)
    assert torch.equal(mask, mask_ref)
    assert torch.equal(y_inv, y)  # the same activation code in both kernels


# --- few-bit codes and gradients: all bit widths, odd sizes -----------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", BITS)
def test_fewbit_roundtrip(device, dtype, bits):
    act = get("gelu")
    borders, levels = _table(bits, device, seed=bits)
    for n in SIZES:
        x = _inputs(n, dtype, device, seed=n)
        y, packed = triton_fewbit.fewbit_forward(x, act.name, act.param_list, borders, levels, bits)
        y_ref, packed_ref = ref_fewbit._forward(x, act.name, act.param_list, borders, bits)
        assert packed.numel() == (n * bits + 7) // 8 + 1  # the codes, then the flag byte
        assert torch.equal(packed, packed_ref), (n, bits)
        grad = _inputs(n, dtype, device, seed=n + 1)
        out = triton_fewbit.fewbit_backward(grad, packed, levels, bits)
        assert torch.equal(out, ref_fewbit._backward(grad, packed_ref, levels, bits)), (n, bits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_small_blocks_share_no_bytes(device, bits):
    """Many programs with tails inside a block: every program writes only its own bytes."""
    act = get("silu")
    borders, levels = _table(bits, device)
    x = _inputs(1003, torch.float32, device)  # 16 programs, the last one with 43 elements
    y, packed = triton_fewbit.fewbit_forward(x, act.name, act.param_list, borders, levels, bits, block=64)
    assert torch.equal(packed, ref_fewbit._forward(x, act.name, act.param_list, borders, bits)[1])
    out = triton_fewbit.fewbit_backward(x, packed, levels, bits, block=64)
    assert torch.equal(out, ref_fewbit._backward(x, packed, levels, bits))
    _, mask = triton_inverted.inverted_forward(x, act.name, act.param_list, block=64)
    assert torch.equal(mask, ref_inverted._forward(x, act.name, act.param_list)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 4, 7])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # silu(-inf) = nan
def test_codes_edge_values(device, bits):
    """NaN, infinities, values on borders, duplicate borders and short tables bucketize like torch."""
    act = get("relu")
    borders = torch.linspace(-2, 2, (1 << bits) - 1)
    if borders.numel() > 2:
        borders[1] = borders[2]  # duplicate border
    x = torch.cat([borders, torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])])
    x = torch.cat([x, _inputs(300, torch.float32, "cpu")]).to(device)
    _, levels = _table(bits, device)
    for b in (borders, borders[: max(1, borders.numel() // 2)]):  # full and short table
        b = b.to(device)
        _, packed = triton_fewbit.fewbit_forward(x, act.name, act.param_list, b, levels, bits)
        assert torch.equal(packed, ref_fewbit._forward(x, act.name, act.param_list, b, bits)[1])
    silu = get("silu")
    _, mask = triton_inverted.inverted_forward(x, silu.name, silu.param_list)
    assert torch.equal(mask, ref_inverted._forward(x, silu.name, silu.param_list)[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", _act_cases(), ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_inputs_match_torch(device, dtype, act):
    """The flag byte after the codes (some x has a NaN derivative: backward is NaN) and the
    inverted masks and closed forms at NaN and +-inf, as the torch implementations."""
    x = torch.cat([torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(3),
                   _inputs(1200, torch.float32, "cpu")]).to(dtype).to(device)
    borders, levels = _table(3, device)
    for xs in (x, x[9:]):  # with and without non-finite values
        _, packed = triton_fewbit.fewbit_forward(xs, act.name, act.param_list, borders, levels, 3)
        packed_ref = ref_fewbit._forward(xs, act.name, act.param_list, borders, 3)[1]
        assert torch.equal(packed, packed_ref)
        out = triton_fewbit.fewbit_backward(xs, packed, levels, 3)
        assert torch.equal(out.isnan(), ref_fewbit._backward(xs, packed_ref, levels, 3).isnan())
    y, mask = triton_inverted.inverted_forward(x, act.name, act.param_list)
    y_ref, mask_ref = ref_inverted._forward(x, act.name, act.param_list)
    assert torch.equal(mask, mask_ref)
    if triton_inverted.has_closed_form_backward(act.name, act.param_list):
        out = triton_inverted.inverted_backward(torch.ones_like(x), y_ref, mask_ref, act.name, act.param_list)
        expected = ref_inverted._backward(torch.ones_like(x), y_ref, mask_ref, act.name, act.param_list)
        inf = x[:9].isinf()  # at NaN torch's own CPU and CUDA kernels disagree (ELU: NaN, 1)
        assert torch.equal(out[:9][inf].isnan(), expected[:9][inf].isnan())
        assert torch.equal(out[:9][inf].nan_to_num(), expected[:9][inf].nan_to_num())
        # a NaN upstream gradient: 0 where torch's backward selects 0 (flat pieces), else NaN
        nan_g = torch.full_like(x, float("nan"))
        out = triton_inverted.inverted_backward(nan_g, y_ref, mask_ref, act.name, act.param_list)
        expected = ref_inverted._backward(nan_g, y_ref, mask_ref, act.name, act.param_list)
        assert torch.equal(out[9:].isnan(), expected[9:].isnan())


# --- inverted backward: the closed forms ------------------------------------------------
CLOSED = [a for a in _act_cases() if triton_inverted.has_closed_form_backward(a.name, a.param_list)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", CLOSED, ids=str)
def test_inverted_backward_matches_torch(device, dtype, act):
    for n in (7, 4099):
        x = _inputs(n, dtype, device, seed=n)
        y, mask = ref_inverted._forward(x, act.name, act.param_list)
        grad = _inputs(n, dtype, device, seed=n + 1)
        out = triton_inverted.inverted_backward(grad, y, mask, act.name, act.param_list)
        expected = ref_inverted._backward(grad, y, mask, act.name, act.param_list)
        assert_close_scaled(out, expected, grad, _ulps(device))


def test_numerical_inverse_activations_use_torch():
    """gelu & co. need fewbit_fx.inverse; the CUDA path hands them to the torch op."""
    for name in ("gelu", "gelu_tanh", "silu", "mish", "tanhshrink", "gelu_tanh_formula", "quick_gelu"):
        assert not triton_inverted.has_closed_form_backward(name, get(name).param_list)
    assert not triton_inverted.has_closed_form_backward("elu", [-0.5])  # torch rejects it
    assert triton_inverted.has_closed_form_backward("hardswish", [])


# --- layouts, empty tensors, float64 ----------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_noncontiguous_inputs(device):
    act = get("softsign")
    borders, levels = _table(3, device)
    base = _inputs(64 * 96, torch.float32, device).view(64, 96)
    for x in (base.t(), base[:, ::2], base[::3]):
        before = x.clone()
        y, packed = triton_fewbit.fewbit_forward(x, act.name, act.param_list, borders, levels, 3)
        y_ref, packed_ref = ref_fewbit._forward(x, act.name, act.param_list, borders, 3)
        assert torch.equal(packed, packed_ref)
        assert y.shape == y_ref.shape and y.stride() == y_ref.stride()
        assert_close_scaled(y, y_ref, x, _ulps(device))
        y_inv, _ = triton_inverted.inverted_forward(x, act.name, act.param_list)
        assert y_inv.stride() == y_ref.stride()
        out = triton_fewbit.fewbit_backward(x, packed, levels, 3)
        assert torch.equal(out, ref_fewbit._backward(x, packed_ref, levels, 3))
        out = triton_inverted.inverted_backward(x, y_ref, packed[:0], act.name, act.param_list)
        assert out.stride() == ref_inverted._backward(x, y_ref, packed[:0], act.name, act.param_list).stride()
        assert torch.equal(x, before)  # inputs are never written


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("a kernel was launched for an empty tensor")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors_launch_nothing(device, monkeypatch):
    for mod, name in [(triton_fewbit, "_fewbit_forward_kernel"), (triton_fewbit, "_fewbit_backward_kernel"),
                      (triton_inverted, "_inverted_forward_kernel"), (triton_inverted, "_inverted_backward_kernel")]:
        monkeypatch.setattr(mod, name, _NoLaunch())
    x = torch.empty(0, 5, device=device)
    borders, levels = _table(3, device)
    y, packed = triton_fewbit.fewbit_forward(x, "gelu", [], borders, levels, 3)
    assert y.shape == (0, 5) and packed.numel() == 1 and packed.dtype == torch.uint8  # the flag
    assert triton_fewbit.fewbit_backward(x, packed, levels, 3).shape == (0, 5)
    y, mask = triton_inverted.inverted_forward(x, "hardswish", [])
    assert y.shape == (0, 5) and mask.numel() == 0
    assert triton_inverted.inverted_backward(x, y, mask, "hardswish", []).shape == (0, 5)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_uses_torch(device):
    x = _inputs(100, torch.float64, device)
    borders, levels = _table(4, device)
    y, packed = triton_fewbit.fewbit_forward(x, "tanh", [], borders, levels, 4)
    y_ref, packed_ref = ref_fewbit._forward(x, "tanh", [], borders, 4)
    assert torch.equal(y, y_ref) and torch.equal(packed, packed_ref)
    y, mask = triton_inverted.inverted_forward(x, "hardswish", [])
    assert torch.equal(y, ref_inverted._forward(x, "hardswish", [])[0])


# --- registration -------------------------------------------------------------------------
def test_registration_is_guarded(monkeypatch):
    import fewbit_fx.kernels as kernels

    monkeypatch.setattr(kernels, "_registered", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.register_cuda_kernels() is False
    if not torch.backends.cuda.is_built():
        monkeypatch.delenv("TRITON_INTERPRET")
        assert kernels.register_cuda_kernels() is False


@pytest.mark.skipif(not HAS_CUDA or INTERPRETED, reason="needs CUDA (compiled kernels)")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ops_dispatch_to_kernels_on_cuda(dtype):
    """Through the registered ops and autograd, the modules' gradients match the torch path."""
    from fewbit_fx.kernels import register_cuda_kernels

    assert register_cuda_kernels()
    borders, levels = _table(3, "cuda")
    x = _inputs(1 << 16, dtype, "cuda").requires_grad_(True)
    y, packed = torch.ops.fewbit_fx.fewbit_forward(x, "gelu", [], borders, levels, 3)
    assert torch.equal(packed, ref_fewbit._forward(x.detach(), "gelu", [], borders, 3)[1])
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gx, ref_fewbit._backward(torch.ones_like(y), packed, levels, 3))
    y, mask = torch.ops.fewbit_fx.inverted_forward(x, "hardswish", [])
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    expected = ref_inverted._backward(torch.ones_like(y), y.detach(), mask, "hardswish", [])
    assert_close_scaled(gx, expected, torch.ones_like(gx), 1)


@pytest.mark.skipif(INTERPRETED, reason="this process already interprets the kernels")
def test_interpreter_subprocess():
    """Run this file's CPU cases in a child process with TRITON_INTERPRET=1."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-o", "addopts=", "-q", "-p", "no:cacheprovider",
           "-k", "not test_interpreter_subprocess"]
    res = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[2],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-20000:] + res.stderr[-5000:]
    found = re.search(r"(\d+) passed", res.stdout)
    assert found and int(found[1]) >= 100, f"the interpreter run checked too little: {res.stdout[-2000:]}"
