"""Dense bit packing: n codes of b bits (1..8) take exactly ceil(n*b/8) bytes.

Code i occupies bits [i*b, (i+1)*b) of a little-endian bit stream (bit 0 of byte 0 first),
so 3-bit codes really cost 3 bits. Written in plain tensor ops (shifts, a small sum) so
that Inductor can fuse packing into the activation kernel and unpacking into backward.
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_bits(bits: int) -> int:
    """Validate a bits-per-element setting; the error says what is allowed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")
    return bits


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n*bits/8) bytes.

    Byte k of a group of 8 codes is the OR of the few codes that overlap its 8 stream bits,
    each shifted into place: pointwise work only (no reduction), which Inductor turns into
    one vectorized kernel (a sum-based version ran ~100x slower compiled)."""
    check_bits(bits)
    n = codes.numel()
    if bits == 8:
        return codes.reshape(-1).to(torch.uint8)
    groups = -(-n // 8)
    c = torch.nn.functional.pad(codes.reshape(-1).to(torch.int32), (0, groups * 8 - n)).view(groups, 8)
    out = [_or([_shift(c[:, i], i * bits - 8 * k) for i in range(8)
                if i * bits < 8 * k + 8 and (i + 1) * bits > 8 * k]) & 0xFF
           for k in range(bits)]  # byte k: stream bits [8k, 8k + 8), codes that overlap it
    packed = torch.stack(out, dim=1).to(torch.uint8).reshape(-1)
    nbytes = packed_nbytes(n, bits)
    return packed if packed.numel() == nbytes else packed[:nbytes].clone()


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack`: the first `numel` codes as a flat uint8 tensor.

    When bits divides 8 each code lies in one byte: code i is read from byte i*bits // 8
    by an indexed load, which Inductor fuses into the consumer's loop (the grouped form
    below made it materialise the codes through a scalar loop, ~3x slower compiled).
    Other widths OR the bytes that overlap each code, in groups of 8 codes."""
    check_bits(bits)
    if bits == 8:
        return packed[:numel]
    if 8 % bits == 0:
        pos = torch.arange(numel, device=packed.device, dtype=torch.int32) * bits
        return ((packed[pos >> 3].to(torch.int32) >> (pos & 7)) & ((1 << bits) - 1)).to(torch.uint8)
    groups = -(-numel // 8)
    d = torch.nn.functional.pad(packed, (0, groups * bits - packed.numel())).view(groups, bits).to(torch.int32)
    out = [_or([_shift(d[:, k], 8 * k - i * bits) for k in range(bits)
                if 8 * k < (i + 1) * bits and 8 * k + 8 > i * bits]) & ((1 << bits) - 1)
           for i in range(8)]  # code i: stream bits [i*bits, (i+1)*bits), bytes that hold it
    return torch.stack(out, dim=1).to(torch.uint8).reshape(-1)[:numel]


def _shift(v: Tensor, s: int) -> Tensor:
    return v << s if s >= 0 else v >> -s


def _or(terms: list[Tensor]) -> Tensor:
    out = terms[0]
    for t in terms[1:]:
        out = out | t
    return out
