"""The inverted norm ops fewbit_fx::inverted_norm_forward / inverted_norm_backward and
Inverted(LayerNorm / RMSNorm): forward bitwise equal to torch's, gradients within 2x the
floor of an exact inverse of the stored y (measured against float64 autograd), the guard
for channels y cannot tell (gamma = 0, tiny gamma, huge beta), torch.compile, saved bytes.

The floor: an exact (float64) inverse of y rounded to its dtype, without the offset beta
and without underflow (each channel's gamma scaled by a power of two into [1, 2), which
rounds identically in relative terms). That is what y's own rounding allows; the guard
must keep cancellation (huge beta) and underflow (tiny gamma) from making it worse.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch._dynamo

import fewbit_fx.ops  # noqa: F401  (registers the ops)
from fewbit_fx.measure import saved_bytes
from fewbit_fx.nn import Inverted, InvertedNorm
from fewbit_fx.ops import norm as norm_mod
from fewbit_fx.ops.norm import plain_norm

fwd = torch.ops.fewbit_fx.inverted_norm_forward
KINDS = ["layer_norm", "rms_norm", "hf_rms_norm", "t5_rms_norm", "uncast_rms_norm"]
ATEN_RMS = ("hf_rms_norm", "t5_rms_norm", "uncast_rms_norm")  # RMSNorms written as aten ops
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
EPS = 1e-5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make(kind, dtype, wdtype=None, rows=96, n=64, seed=0, gamma=None, beta=None, beta_scale=0.3):
    """x, weight, bias, upstream gradient; gamma ~ 1 +- 0.5 (a trained norm's range)."""
    g = _gen(seed)
    wdtype = wdtype or dtype
    x = (torch.randn(rows, n, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = gamma if gamma is not None else 1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    b = None
    if kind == "layer_norm":
        b = beta if beta is not None else beta_scale * torch.randn(n, generator=g, dtype=torch.float64)
        b = b.to(wdtype)
    up = torch.randn(rows, n, generator=g, dtype=torch.float64).to(dtype)
    return x, w.to(wdtype), b, up


def op_grads(kind, x, w, b, up, allow_whole=True):
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    xr, wr = leaves[0], leaves[1]
    br = leaves[2] if b is not None else None
    y, *rest = fwd(xr, kind, [x.shape[-1]], wr, br, EPS, allow_whole)
    return y, rest, torch.autograd.grad(y, leaves, up)


def torch_grads(kind, x, w, b, up):
    """torch's own autograd of the formula at x's dtype."""
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    y = plain_norm(leaves[0], kind, [x.shape[-1]], leaves[1], leaves[2] if b is not None else None, EPS)
    return torch.autograd.grad(y, leaves, up)


def exact_grads(kind, x, w, b, up):
    """float64 autograd of the formula's mathematics (HF's and T5's casts dropped)."""
    leaves = [t.detach().double().clone().requires_grad_(True) for t in (x, w, b) if t is not None]
    k = "rms_norm" if kind in ATEN_RMS else kind
    y = plain_norm(leaves[0], k, [x.shape[-1]], leaves[1], leaves[2] if b is not None else None, EPS)
    return torch.autograd.grad(y, leaves, up.double())


def formula_grads(kind, xhat, rstd, w, b, up):
    """The norm backward from x_hat (float64), written independently of the op."""
    g, gamma = up.double(), w.double()
    gh = g * gamma
    proj = (gh * xhat).mean(1, keepdim=True)
    if kind == "layer_norm":
        gx = rstd * (gh - gh.mean(1, keepdim=True) - xhat * proj)
    else:
        gx = rstd * (gh - xhat * proj)
    out = [gx, (g * xhat).sum(0)]
    return out + ([g.sum(0)] if b is not None else [])


def exact_xhat(kind, x):
    x64 = x.double()
    if kind == "layer_norm":
        var, mean = torch.var_mean(x64, dim=1, correction=0, keepdim=True)
        return (x64 - mean) * torch.rsqrt(var + EPS), torch.rsqrt(var + EPS)
    rstd = torch.rsqrt(x64.pow(2).mean(1, keepdim=True) + EPS)
    return x64 * rstd, rstd


def floor_grads(kind, x, w, b, up, ydtype):
    """Gradients from an exact inverse of y rounded to ydtype, with no beta and no
    underflow (see the module docstring); exact x_hat where gamma = 0."""
    xhat, rstd = exact_xhat(kind, x)
    pre = xhat.to(x.dtype).double() if kind in ("hf_rms_norm", "uncast_rms_norm") else xhat  # rounded first
    if kind == "t5_rms_norm" and w.dtype in (torch.float16, torch.bfloat16):
        pre = xhat.to(w.dtype).double()  # T5 rounds it to a half weight's dtype
    gamma = w.double()
    m = torch.where(gamma == 0, torch.ones_like(gamma), gamma / torch.exp2(torch.floor(torch.log2(gamma.abs()))))
    rec = (pre * m).to(ydtype).double() / m
    rec = torch.where(gamma == 0, xhat, rec)
    return formula_grads(kind, rec, rstd, w, b, up)


def max_err(a, ref):
    return float((a.double() - ref).abs().max())


def check_bound(kind, x, w, b, up, ours, ydtype):
    """ours within 2x the floor, plus as slack what torch's own backward at this dtype
    gets wrong (its compute and output rounding, which no method of recovering x_hat
    avoids) and two ulps of the compute dtype at the gradient's scale (our own sums).
    Returns [(ours, floor, torch's own)] per gradient."""
    ulp = torch.finfo(torch.promote_types(x.dtype, torch.float32)).eps
    ref = exact_grads(kind, x, w, b, up)
    flo = floor_grads(kind, x, w, b, up, ydtype)
    own = torch_grads(kind, x, w, b, up)
    rows = []
    for o, r, f, t in zip(ours, ref, flo, own):
        e, ef, et = max_err(o, r), max_err(f, r), max_err(t, r)
        rows.append((e, ef, et))
        assert e <= 2 * ef + et + 2 * ulp * float(r.abs().max()), (kind, x.dtype, rows)
    return rows


# --- forward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_torchs_bitwise(kind, dtype):
    for wdtype in ([dtype, torch.float32] if dtype in (torch.bfloat16, torch.float16) else [dtype]):
        x, w, b, _ = make(kind, dtype, wdtype)
        y, mean, rstd, side, idx = fwd(x, kind, [x.shape[-1]], w, b, EPS, True)
        assert torch.equal(y, plain_norm(x, kind, [x.shape[-1]], w, b, EPS))
        assert rstd.dtype == torch.promote_types(dtype, torch.float32) or kind in ATEN_RMS
        assert rstd.shape == (x.shape[0], 1) and side.shape == (x.shape[0], idx.numel())
        assert torch.equal(side, x[:, idx])
        assert mean.numel() == (x.shape[0] if kind == "layer_norm" else 0)


def test_forward_matches_torch_functions_directly():
    x, w, b, _ = make("layer_norm", torch.bfloat16, rows=6, n=20)
    x3 = x.view(2, 3, 4, 5)
    y = fwd(x3, "layer_norm", [4, 5], w.view(4, 5), b.view(4, 5), EPS, True)[0]
    assert torch.equal(y, F.layer_norm(x3, [4, 5], w.view(4, 5), b.view(4, 5), EPS))
    y = fwd(x3, "rms_norm", [4, 5], w.view(4, 5), None, None, True)[0]
    assert torch.equal(y, F.rms_norm(x3, [4, 5], w.view(4, 5)))
    assert torch.equal(fwd(x3, "rms_norm", [5], None, None, None, True)[0], F.rms_norm(x3, [5]))


class LlamaStyleRMSNorm(nn.Module):
    """Hugging Face's LlamaRMSNorm, verbatim formula."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class UncastRMSNorm(nn.Module):
    """The aten-op RMSNorm written without dtype casts (any name, `eps`)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def T5LayerNorm(d):
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return T5LayerNorm(d)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=str)
def test_t5_formula_bitwise(wdtype, xdtype):
    """T5LayerNorm itself, every mix of x and weight dtypes (it casts to half weights only)."""
    m = T5LayerNorm(64).to(wdtype)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(5, 7, 64, generator=_gen(3)).to(xdtype)
    y = fwd(x, "t5_rms_norm", [64], m.weight, None, m.variance_epsilon, True)[0]
    assert y.dtype == m(x).dtype and torch.equal(y, m(x))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32], ids=str)
def test_hf_formula_bitwise(wdtype):
    m = LlamaStyleRMSNorm(64).to(wdtype)
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(5, 7, 64, generator=_gen(3)).to(torch.bfloat16)
    y = fwd(x, "hf_rms_norm", [64], m.weight, None, m.variance_epsilon, True)[0]
    assert y.dtype == m(x).dtype and torch.equal(y, m(x))


# --- backward --------------------------------------------------------------------------------

def test_reference_formula_is_torchs_autograd():
    # The independent backward formula the floor uses, checked against torch (float64).
    for kind in KINDS:
        x, w, b, up = make(kind, torch.float64)
        xhat, rstd = exact_xhat(kind, x)
        for a, r in zip(formula_grads(kind, xhat, rstd, w, b, up), exact_grads(kind, x, w, b, up)):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_gradients_within_twice_the_floor(kind, dtype):
    for wdtype in ([dtype, torch.float32] if dtype in (torch.bfloat16, torch.float16) else [dtype]):
        x, w, b, up = make(kind, dtype, wdtype)
        y, _, ours = op_grads(kind, x, w, b, up)
        check_bound(kind, x, w, b, up, ours, y.dtype)


def test_rms_norm_is_exact_to_a_few_ulp():
    # y / gamma keeps y's relative accuracy: fp32 gradients as good as torch's own.
    x, w, b, up = make("rms_norm", torch.float32)
    _, _, ours = op_grads("rms_norm", x, w, b, up)
    for o, r, t in zip(ours, exact_grads("rms_norm", x, w, b, up), torch_grads("rms_norm", x, w, b, up)):
        assert max_err(o, r) <= 2 * max_err(t, r) + 4 * torch.finfo(torch.float32).eps * float(r.abs().max())


def test_chunked_backward_equals_whole(monkeypatch):
    monkeypatch.setenv("FEWBIT_FX_CPU_KERNELS", "0")  # the torch-op path, in row blocks
    x, w, b, up = make("layer_norm", torch.float32, rows=3000, n=64, seed=5)
    y, (mean, rstd, side, idx), _ = op_grads("layer_norm", x, w, b, up)
    args = (up, y, mean, rstd, side, idx, w, b, "layer_norm", 1, False)
    chunked = torch.ops.fewbit_fx.inverted_norm_backward(*args)
    whole = norm_mod._backward(*args)
    torch.testing.assert_close(chunked[0], whole[0], rtol=0, atol=0)
    for a, c in zip(chunked[1:], whole[1:]):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("unsafe_channels", [[3, 10], []], ids=["side columns", "all safe"])
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_cpu_backward_equals_the_torch_ops(kind, unsafe_channels):
    """Long tensors take one Inductor-compiled kernel (fewbit_fx.kernels.cpu): the same
    gradients as the torch ops, but for the order of the sums over rows; with no unsafe
    channel it is the kernel without the column joins."""
    gamma = 1 + 0.5 * torch.randn(64, generator=_gen(2), dtype=torch.float64)
    gamma = gamma.clamp(min=0.5)  # no small gamma: the channels given are the only unsafe ones
    gamma[unsafe_channels] = 0
    x, w, b, up = make(kind, torch.float32, rows=3000, n=64, seed=6, gamma=gamma, beta_scale=0.1)
    y, (mean, rstd, side, idx), _ = op_grads(kind, x, w, b, up)
    assert sorted(idx.tolist()) == unsafe_channels
    args = (up, y, mean, rstd, side, idx, w, b, kind, 1, False)
    compiled = norm_mod._compiled_backward(*args, not unsafe_channels)
    assert compiled is not None, "the compiled kernel failed"
    whole = norm_mod._backward(*args)
    torch.testing.assert_close(compiled[0], whole[0], rtol=1e-5, atol=1e-6)
    for a, c in zip(compiled[1:], whole[1:]):  # sums of 3000 fp32 terms, in two orders
        torch.testing.assert_close(a, c, rtol=1e-5, atol=3e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_all_safe_backward_leaves_out_only_the_joins(kind):
    """With idx empty the shortcut without the column joins gives the general path's bits."""
    x, w, b, up = make(kind, torch.float32, rows=200, n=64, seed=7,
                       gamma=1 + 0.1 * torch.randn(64, generator=_gen(3), dtype=torch.float64),
                       beta_scale=0.1)
    y, (mean, rstd, side, idx), _ = op_grads(kind, x, w, b, up)
    assert idx.numel() == 0
    args = (up, y, mean, rstd, side, idx, w, b, kind, 1, False)
    for a, c in zip(norm_mod._backward(*args, True), norm_mod._backward(*args, False)):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


# --- the guard -------------------------------------------------------------------------------

def _unsafe(kind, x, w, b):
    return set(fwd(x, kind, [x.shape[-1]], w, b, EPS, True)[4].tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_zero_gamma_channels_keep_x(kind, dtype):
    gamma = 1 + 0.5 * torch.randn(64, generator=_gen(1), dtype=torch.float64)
    gamma[[3, 10, 11]] = 0
    x, w, b, up = make(kind, dtype, gamma=gamma)
    unsafe = _unsafe(kind, x, w, b)
    assert {3, 10, 11} <= unsafe and len(unsafe) <= 6  # (LayerNorm: a few small-gamma channels too)
    y, _, ours = op_grads(kind, x, w, b, up)
    assert all(torch.isfinite(g).all() for g in ours)
    check_bound(kind, x, w, b, up, ours, y.dtype)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_gamma(kind):
    # fp16: gamma 1e-6 puts y = gamma * x_hat in the subnormal range (absolute rounding);
    # 2e-3 keeps it normal, where y / gamma is as good as anywhere.
    gamma = 1 + 0.5 * torch.randn(64, generator=_gen(2), dtype=torch.float64)
    gamma[:4] = 1e-6
    gamma[4:8] = 2e-3
    x, w, b, up = make(kind, torch.float16, gamma=gamma, beta=torch.zeros(64, dtype=torch.float64))
    assert _unsafe(kind, x, w, b) == {0, 1, 2, 3}
    y, _, ours = op_grads(kind, x, w, b, up)
    check_bound(kind, x, w, b, up, ours, y.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_beta_channels_keep_x(dtype):
    beta = 0.3 * torch.randn(64, generator=_gen(4), dtype=torch.float64)
    beta[[0, 5, 9]] = 1e3
    x, w, b, up = make("layer_norm", dtype, beta=beta)
    unsafe = _unsafe("layer_norm", x, w, b)
    assert {0, 5, 9} <= unsafe and len(unsafe) < 10
    y, _, ours = op_grads("layer_norm", x, w, b, up)
    check_bound("layer_norm", x, w, b, up, ours, y.dtype)


def test_without_the_guard_huge_beta_breaks_the_bound(monkeypatch):
    # The bound test can fail: recovering every channel from y loses x_hat to cancellation.
    beta = 0.3 * torch.randn(64, generator=_gen(4), dtype=torch.float64)
    beta[[0, 5, 9]] = 1e3
    x, w, b, up = make("layer_norm", torch.float32, beta=beta)
    monkeypatch.setattr(norm_mod, "unsafe_channels",
                        lambda y, nd, weight, bias: torch.zeros(y.shape[-1], dtype=torch.bool))
    y, (_, _, side, _), ours = op_grads("layer_norm", x, w, b, up)
    assert side.numel() == 0
    with pytest.raises(AssertionError):
        check_bound("layer_norm", x, w, b, up, ours, y.dtype)


def test_bound_is_the_column_spread():
    # |beta_j| <= max_i |y_ij - beta_j|: just inside and just outside.
    x = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # x_hat = +-1 in both columns
    w = torch.tensor([1.0, 1.0])
    assert _unsafe("layer_norm", x, w, torch.tensor([0.99, 1.02])) == {1}
    assert _unsafe("layer_norm", x, w, torch.tensor([float("nan"), 0.0])) == {0}
    assert _unsafe("rms_norm", x, torch.tensor([float("inf"), 1.0]), None) == {0}


def test_most_channels_unsafe_saves_x_itself():
    # gamma = 0 everywhere (adaLN-zero init): the whole call saves x, no copy.
    x, w, b, up = make("layer_norm", torch.float32, gamma=torch.zeros(64, dtype=torch.float64))
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fwd(xr, "layer_norm", [64], wr, br, EPS, True)[0]
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert xr.untyped_storage().data_ptr() in ptrs
    grads = torch.autograd.grad(y, (xr, wr, br), up)
    for a, r in zip(grads, torch_grads("layer_norm", x, w, b, up)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
    # In a traced graph (allow_whole=False) the same call copies the columns instead.
    _, _, _, side, idx = fwd(x, "layer_norm", [64], w, b, EPS, False)
    assert side.shape == (x.shape[0], 64) and idx.numel() == 64


# --- torch.compile ---------------------------------------------------------------------------

def _model(kind, zero_channels=True):
    torch.manual_seed(0)
    norm = {"layer_norm": lambda: nn.LayerNorm(32), "rms_norm": lambda: nn.RMSNorm(32),
            "hf_rms_norm": lambda: LlamaStyleRMSNorm(32), "t5_rms_norm": lambda: T5LayerNorm(32),
            "uncast_rms_norm": lambda: UncastRMSNorm(32)}[kind]()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        if zero_channels:
            norm.weight[:3] = 0
        if kind == "layer_norm":
            norm.bias.normal_(0, 0.1)
    return nn.Linear(16, 32), norm, nn.Linear(32, 8)


def _step_grads(model, x):
    model.zero_grad()
    model(x).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", KINDS)
def test_compiled_gradients_equal_eager(kind):
    a, norm, b = _model(kind)
    ours = nn.Sequential(a, Inverted(norm), b)
    x = torch.randn(4, 10, 16, generator=_gen(7))
    eager = _step_grads(ours, x)
    for fullgraph in (True, False):  # True: fused by Inductor; False: a graph break at the op
        torch._dynamo.reset()
        compiled = _step_grads(torch.compile(ours, fullgraph=fullgraph), x)
        for e, c in zip(eager, compiled):
            torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


# --- memory ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_saved_bytes_drop_by_x(kind):
    a, norm, b = _model(kind, zero_channels=False)
    x = torch.randn(8, 64, 16, generator=_gen(8)).requires_grad_(True)
    params = list(a.parameters()) + list(norm.parameters()) + list(b.parameters())

    def measure(model):
        rec = saved_bytes(lambda: model(x).pow(2).sum(), exclude=params)
        rec.loss.backward()
        return rec.bytes

    plain = measure(nn.Sequential(a, norm, b))
    inverted = measure(nn.Sequential(a, Inverted(norm), b))
    torch._dynamo.reset()  # default torch.compile: a graph break at the op keeps the eager saving
    assert measure(torch.compile(nn.Sequential(a, Inverted(norm), b))) == inverted
    # fullgraph: Inductor's partitioner plans the saves; it keeps x's unsafe columns, not x,
    # and recovers x_hat in backward (it saved a full x_hat, then x, before gather_columns
    # and the gradient-side recovery in _backward_2d)
    torch._dynamo.reset()
    assert measure(torch.compile(nn.Sequential(a, Inverted(norm), b), fullgraph=True)) == inverted
    torch._dynamo.reset()
    rows, d = 8 * 64, 32
    stats = rows * 4 * (2 if kind == "layer_norm" else 1)  # fp32 mean (LayerNorm), rstd
    x_bytes = rows * d * 4
    # Left: the first Linear's input, y (kept by the second Linear: the same storage), the
    # statistics, and the output the loss's pow keeps.
    assert inverted == x.numel() * 4 + x_bytes + stats + rows * 8 * 4, (plain, inverted)
    assert plain - inverted >= x_bytes - stats
    if kind == "layer_norm":  # torch's LayerNorm keeps the same statistics, and x
        assert plain - inverted == x_bytes
    print(f"saved bytes {kind}: plain {plain}, inverted {inverted}")


# --- module ----------------------------------------------------------------------------------

def test_module_shares_parameters_and_state_dict():
    for norm in (nn.LayerNorm(32), nn.RMSNorm(32), LlamaStyleRMSNorm(32), T5LayerNorm(32),
                 nn.LayerNorm(32, elementwise_affine=False), nn.LayerNorm(32, bias=False),
                 nn.RMSNorm(32, elementwise_affine=False)):
        inv = Inverted(norm)
        assert isinstance(inv, InvertedNorm) and isinstance(inv, Inverted)
        assert list(inv.state_dict()) == list(norm.state_dict())
        assert all(p is q for p, q in zip(inv.parameters(), norm.parameters()))
        assert len(list(inv.parameters())) == len(list(norm.parameters()))
        inv.load_state_dict(norm.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("make_norm", [lambda: nn.LayerNorm(32), lambda: nn.RMSNorm(32, eps=1e-6),
                                       lambda: LlamaStyleRMSNorm(32), lambda: T5LayerNorm(32),
                                       lambda: nn.LayerNorm(32, elementwise_affine=False)],
                         ids=["layer_norm", "rms_norm", "hf", "t5", "no_affine"])
def test_module_matches_wrapped(make_norm, dtype):
    norm = make_norm().to(dtype)
    for p in norm.parameters():
        with torch.no_grad():
            p.normal_(1, 0.5)
    inv = Inverted(norm)
    x = torch.randn(6, 32, generator=_gen(9)).to(dtype)
    with torch.no_grad():
        assert torch.equal(inv(x), norm(x))
    xr = x.clone().requires_grad_(True)
    y = inv(xr)
    assert torch.equal(y, norm(x))
    up = torch.randn_like(y)
    ours = torch.autograd.grad(y, [xr, *norm.parameters()], up)
    xr2 = x.clone().requires_grad_(True)
    theirs = torch.autograd.grad(norm(xr2), [xr2, *norm.parameters()], up)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o.float(), t.float(), rtol=tol, atol=tol)


def test_module_errors_name_fewbit():
    with pytest.raises(TypeError, match="floating-point"):
        Inverted(nn.LayerNorm(4))(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="fewbit-fx"):
        Inverted(nn.LayerNorm(4))(torch.ones(2, 5, requires_grad=True))
    inv = Inverted(nn.LayerNorm(4))
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="fewbit-fx.*torch.func"):
        torch.func.grad(lambda t: inv(t).sum())(x)
    with pytest.raises(TypeError, match="fewbit-fx"):
        InvertedNorm(nn.GELU())
