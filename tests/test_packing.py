"""Bit packing of few-bit codes (fewbit_fx.packing).

Layout contract: code i occupies bits [i*b, (i+1)*b) of a little-endian bit stream, so the
packed buffer has exactly ceil(n*b/8) bytes. The reference below builds that stream with
Python integers, independently of the tensor implementation.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fewbit_fx.packing import check_bits, pack, packed_nbytes, unpack


def reference_pack(codes: list[int], bits: int) -> bytes:
    value = 0
    for i, c in enumerate(codes):
        value |= c << (i * bits)
    return value.to_bytes(math.ceil(len(codes) * bits / 8), "little")


@st.composite
def codes_and_bits(draw, max_len: int = 2000):
    bits = draw(st.integers(1, 8))
    n = draw(st.integers(0, max_len))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n,), generator=g)
    return codes, bits


@settings(max_examples=150, deadline=None)
@given(codes_and_bits())
def test_round_trip_and_length(case):
    codes, bits = case
    n = codes.numel()
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.dim() == 1
    assert packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    out = unpack(packed, bits, n)
    assert out.dtype == torch.uint8
    assert torch.equal(out.to(torch.int64), codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_bits(max_len=300))
def test_layout_matches_little_endian_bit_stream(case):
    codes, bits = case
    packed = pack(codes, bits)
    assert bytes(packed.tolist()) == reference_pack(codes.tolist(), bits)


@settings(max_examples=60, deadline=None)
@given(codes_and_bits(max_len=300))
def test_packed_buffer_owns_exactly_its_bytes(case):
    # The memory claim is about what stays alive: the storage, not just the visible length.
    codes, bits = case
    packed = pack(codes, bits)
    assert packed.untyped_storage().nbytes() == math.ceil(codes.numel() * bits / 8)


@settings(max_examples=60, deadline=None)
@given(codes_and_bits(max_len=300))
def test_unpack_reads_a_reference_stream(case):
    codes, bits = case
    stream = torch.tensor(list(reference_pack(codes.tolist(), bits)), dtype=torch.uint8)
    assert torch.equal(unpack(stream, bits, codes.numel()).to(torch.int64), codes)


@pytest.mark.parametrize(
    "codes, bits, expected",
    [
        ([1, 0, 1, 1, 0, 0, 0, 1], 1, [0b10001101]),
        ([1, 1, 1], 1, [0b00000111]),
        ([5, 3], 3, [5 | 3 << 3]),  # 0b011_101
        ([7] * 8, 3, [0xFF, 0xFF, 0xFF]),
        ([1, 2, 3], 4, [0x21, 0x03]),
        ([31, 0, 1], 5, [0x1F, 0x04]),  # code 2 starts at bit 10 = bit 2 of byte 1
        ([3, 0, 0, 2], 2, [0b10000011]),
        ([0x7F, 0x01], 7, [0xFF, 0x00]),  # code 1 starts at bit 7 of byte 0
        ([0x00, 0x7F], 7, [0x80, 0x3F]),
        ([200, 7, 255], 8, [200, 7, 255]),
        ([], 3, []),
    ],
)
def test_known_small_layouts(codes, bits, expected):
    packed = pack(torch.tensor(codes, dtype=torch.int64), bits)
    assert packed.tolist() == expected
    assert unpack(packed, bits, len(codes)).tolist() == codes


def test_pack_flattens_any_shape_in_logical_order():
    codes = torch.randint(0, 8, (5, 6))
    t = codes.t()  # non-contiguous
    assert torch.equal(pack(t, 3), pack(t.reshape(-1).clone(), 3))
    assert torch.equal(unpack(pack(t, 3), 3, t.numel()).view(t.shape).long(), t)


def test_zero_dim_codes():
    packed = pack(torch.tensor(5), 3)
    assert packed.numel() == 1
    assert unpack(packed, 3, 1).tolist() == [5]


@pytest.mark.parametrize("bits", range(1, 9))
def test_check_bits_accepts_1_to_8(bits):
    assert check_bits(bits) == bits


@pytest.mark.parametrize("bad", [0, 9, -1, 2.5, 3.0, True, False, "3", None])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match="1 to 8"):
        check_bits(bad)


@pytest.mark.parametrize("bad", [0, 9, 2.5, True])
def test_pack_and_unpack_reject_bad_bits(bad):
    with pytest.raises(ValueError):
        pack(torch.zeros(4, dtype=torch.int64), bad)
    with pytest.raises(ValueError):
        unpack(torch.zeros(4, dtype=torch.uint8), bad, 4)
