"""fewbit_fx::unpack: the eager op matches packing.unpack, and its Inductor lowering
(affine, check-free loads) gives the same codes, compiled static and dynamic, and lets the
consumer's loop vectorise."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import fewbit_fx  # noqa: F401  (registers the ops)
from fewbit_fx.packing import pack, unpack as unpack_reference

unpack = torch.ops.fewbit_fx.unpack
SIZES = (1, 7, 8, 9, 1000, 4099)


def _packed(bits: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), generator=g, dtype=torch.uint8)
    return codes, pack(codes, bits)


def _scaled(bits: int):
    """A consumer of the codes shaped like `like` (whose numel is symbolic when compiled
    dynamic), closed over bits as our ops' graphs are."""
    return lambda p, like: unpack(p, bits, like.numel()).view(like.shape).to(torch.float32) * 2.0 + like


@pytest.mark.parametrize("bits", range(1, 9))
def test_eager_op_equals_reference_and_owns_its_memory(bits):
    for n in (0,) + SIZES:
        codes, packed = _packed(bits, n)
        out = unpack(packed, bits, n)
        assert torch.equal(out, codes) and torch.equal(out, unpack_reference(packed, bits, n))
        assert out.numel() == 0 or out.untyped_storage().data_ptr() != packed.untyped_storage().data_ptr()


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("bits", range(1, 9))
def test_lowering_matches_eager(bits, dynamic):
    torch._dynamo.reset()
    f = torch.compile(_scaled(bits), dynamic=dynamic, fullgraph=True)
    with torch._dynamo.config.patch(specialize_int=True):  # bits a constant, as in our graphs
        for seed, n in enumerate(SIZES):
            codes, packed = _packed(bits, n, seed)
            like = torch.randn(1, n)
            assert torch.equal(f(packed, like), codes.float().view(1, n) * 2.0 + like), (bits, n)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_lowering_is_a_vectorised_loop_without_bounds_checks(bits):
    torch._dynamo.reset()
    _, packed = _packed(bits, 4096)
    _, (code,) = run_and_get_code(torch.compile(_scaled(bits), fullgraph=True), packed, torch.randn(4096))
    assert "torch.ops.fewbit_fx.unpack" not in code, "unpack ran as an extern call"
    assert "index out of bounds" not in code
    assert "at::vec::Vectorized" in code


def test_rejects_bits_out_of_range():
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 8"):
        unpack(torch.zeros(4, dtype=torch.uint8), 9, 4)
