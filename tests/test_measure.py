"""fewbit_fx.measure: bytes of distinct storages saved for backward, and what FewBit and
Inverted actually save (the memory claims of the project)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from fewbit_fx.measure import measure_step, saved_bytes
from fewbit_fx.nn import FewBit, Inverted


def _stub_table(act, bits, density=None):
    """Cheap stand-in for optimal_table: saved bytes do not depend on the table's values."""
    edges = torch.linspace(-3.0, 3.0, 2**bits + 1, dtype=torch.float64)
    return SimpleNamespace(borders=edges[1:-1], levels=act.derivative(0.5 * (edges[1:] + edges[:-1])))


# --- the metric itself ----------------------------------------------------------------------
def test_counts_each_saved_storage():
    a = torch.randn(100, requires_grad=True)
    b = torch.randn(100, requires_grad=True)
    record = saved_bytes(lambda: (a * b).sum())
    assert record.bytes == 2 * 100 * 4
    record.loss.backward()
    assert torch.equal(a.grad, b.detach())


def test_exclude_and_views_counted_once():
    a = torch.randn(10, 10, requires_grad=True)
    w = torch.randn(10, 10, requires_grad=True)
    # a[0] and a[1] are views of one storage: counted once, at the storage's full size.
    record = saved_bytes(lambda: (a[0] * a[1]).sum() + (a @ w).sum(), exclude=[w])
    assert record.bytes == 10 * 10 * 4
    assert w.untyped_storage().data_ptr() not in record.storages


def test_nothing_saved_without_grad():
    x = torch.randn(50)
    assert saved_bytes(lambda: torch.sigmoid(x).sum()).bytes == 0
    with torch.no_grad():
        x.requires_grad_(True)
        assert saved_bytes(lambda: torch.sigmoid(x).sum()).bytes == 0


def test_training_step_excludes_parameters_and_runs_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.BatchNorm1d(16), nn.Linear(16, 2))
    x = torch.randn(4, 8)
    n = measure_step(model, (x,), {})
    assert all(p.grad is None for p in model.parameters())  # the step leaves no gradients behind
    # Linear saves x (4*8), sigmoid saves y (4*16); BatchNorm saves its input (= y, shared)
    # plus per-channel statistics; the last Linear saves the BatchNorm output (4*16).
    acts = (4 * 8 + 4 * 16 + 4 * 16) * 4
    assert acts <= n <= acts + 4 * 16 * 4


# --- FewBit: ceil(n * bits / 8) bytes of codes + the flag byte + the levels table ----------------
@pytest.mark.parametrize("n", [1, 7, 13, 64, 1000])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fewbit_saves_packed_codes(bits, n, monkeypatch):
    if bits > 4:  # fitting an 8-bit table is slow; the bytes do not depend on its values
        monkeypatch.setattr("fewbit_fx.tables.optimal_table", _stub_table)
    module = FewBit(nn.GELU(), bits)
    x = torch.randn(n, requires_grad=True)
    codes = math.ceil(n * bits / 8) + 1  # + the non-finite flag (fewbit_fx.ops.fewbit)
    record = saved_bytes(lambda: module(x).sum())
    assert codes <= record.bytes <= codes + 1024
    assert record.bytes == codes + 4 * 2**bits  # exactly: codes + float32 levels
    # The levels are the module's buffer; without it, exactly the codes remain.
    assert saved_bytes(lambda: module(x).sum(), exclude=module.buffers()).bytes == codes
    record.loss.backward()
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fewbit_saved_bytes_do_not_depend_on_dtype(dtype):
    module = FewBit(nn.GELU(), 3)
    x = torch.randn(100, dtype=dtype, requires_grad=True)
    codes_and_flag = math.ceil(300 / 8) + 1
    assert saved_bytes(lambda: module(x).sum(), exclude=module.buffers()).bytes == codes_and_flag


# --- Inverted: y itself (shared storage) + 1 bit per element when non-monotone -------------------
def _record_inverted(module: nn.Module, x: torch.Tensor):
    """(saved_bytes record, its y) and, from a second identical step under a plain hook,
    (the tensors autograd saved, that step's y). saved_tensors_hooks do not nest (only the
    innermost pair runs), hence two steps."""
    wrapper = Inverted(module)
    out = {}

    def step():
        out["y"] = wrapper(x)
        return out["y"].sum()

    record = saved_bytes(step)
    y = out["y"]
    seen = []

    def pack(t):
        seen.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return record, y, seen, out["y"]


@pytest.mark.parametrize("n", [1, 13, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module", [nn.GELU(), nn.SiLU(), nn.Mish(), nn.Hardswish()], ids=lambda m: type(m).__name__)
def test_inverted_non_monotone_saves_y_and_a_mask(module, dtype, n):
    x = torch.randn(n, dtype=dtype, requires_grad=True)
    record, y, seen, y2 = _record_inverted(module, x)
    y_ptr = y.untyped_storage().data_ptr()
    # What the hook saw for y is the returned tensor's memory, not a copy.
    assert [t.data_ptr() == y2.data_ptr() and t.shape == y2.shape for t in seen].count(True) == 1
    assert record.storages[y_ptr] == n * y.element_size()
    others = {p: b for p, b in record.storages.items() if p != y_ptr}
    assert list(others.values()) == [math.ceil(n / 8)]
    assert record.bytes == n * y.element_size() + math.ceil(n / 8)


@pytest.mark.parametrize(
    "module",
    [nn.Sigmoid(), nn.Tanh(), nn.ELU(0.7), nn.LeakyReLU(0.2), nn.ReLU(), nn.Softplus(2, 20), nn.Tanhshrink()],
    ids=lambda m: type(m).__name__,
)
def test_inverted_monotone_saves_only_y(module):
    x = torch.randn(100, requires_grad=True)
    record, y, seen, y2 = _record_inverted(module, x)
    assert list(record.storages) == [y.untyped_storage().data_ptr()]
    assert record.bytes == 100 * 4
    assert any(t.data_ptr() == y2.data_ptr() for t in seen)


def test_softplus_with_a_visible_jump_keeps_a_branch_bit():
    """threshold=5: f jumps by log1p(e^-5)/beta at the threshold, so y alone cannot say
    which side x was on; a 1-bit mask is kept (threshold=20 needs none, see above)."""
    x = torch.randn(100, requires_grad=True)
    record, y, seen, y2 = _record_inverted(nn.Softplus(2, 5), x)
    assert record.bytes == 100 * 4 + math.ceil(100 / 8)


# --- a block: the activation's output is shared with the next layer ------------------------------
def _block_bytes(act: nn.Module, batch: int = 16, d_in: int = 24, d_hidden: int = 40):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d_in, d_hidden), act, nn.Linear(d_hidden, d_in))
    x = torch.randn(batch, d_in, requires_grad=True)
    excluded = list(model.parameters()) + list(model.buffers())
    record = saved_bytes(lambda: model(x).sum(), exclude=excluded)
    record.loss.backward()
    return record.bytes, batch * d_hidden


def test_inverted_block_saves_the_gelu_input_minus_the_mask():
    baseline, n = _block_bytes(nn.GELU())
    inverted, _ = _block_bytes(Inverted(nn.GELU()))
    assert baseline - inverted == n * 4 - math.ceil(n / 8)


def test_inverted_block_monotone_saves_the_whole_input():
    baseline, n = _block_bytes(nn.Tanhshrink())
    inverted, _ = _block_bytes(Inverted(nn.Tanhshrink()))
    assert baseline - inverted == n * 4


def test_fewbit_block_saves_the_gelu_input_minus_the_codes():
    baseline, n = _block_bytes(nn.GELU())
    fewbit, _ = _block_bytes(FewBit(nn.GELU(), 3))  # levels buffer excluded with the model's
    assert baseline - fewbit == n * 4 - math.ceil(n * 3 / 8) - 1  # codes and their flag byte


# --- allocated_peak ------------------------------------------------------------------------
def test_allocated_peak_counts_live_tensors_and_names_the_op():
    from fewbit_fx.measure import allocated_peak

    n = 1 << 18

    def step():
        a = torch.ones(n)          # 1 MiB
        b = torch.ones(n) * 2      # 1 MiB (+ a 1 MiB temporary freed at once)
        c = a + b                  # 1 MiB: three live, the peak
        del a, b, c

    peak = allocated_peak(step)
    assert 3 * 4 * n <= peak.bytes <= 3 * 4 * n + 4096
    assert peak.where.startswith("forward: aten::")


@pytest.mark.parametrize("module,bits", [(nn.GELU(), 3), (nn.SiLU(), 1), (nn.GELU(), 5), (nn.Mish(), None)])
def test_backward_allocates_only_its_output(module, bits):
    """Few-bit and inverted backward must not materialise full-size temporaries (codes as
    int32 did once): at the step's peak they would eat the saving they exist for."""
    from fewbit_fx.measure import allocated_peak

    n = 1 << 18  # long enough for the compiled CPU kernels
    x = torch.randn(n, requires_grad=True)
    layer = FewBit(module, bits=bits) if bits else Inverted(module)
    g = torch.randn(n)
    layer(x).backward(g)  # warm-up: compiles the kernels
    y = layer(x)
    x.grad = None
    peak = allocated_peak(lambda: y.backward(g))
    assert peak.bytes <= 4 * n + 64 * 1024, peak  # x.grad (4 n bytes) and small buffers
