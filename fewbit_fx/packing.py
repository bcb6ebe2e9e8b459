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
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n*bits/8) bytes."""
    check_bits(bits)
    n = codes.numel()
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    groups = -(-n // 8)  # 8 codes fill exactly `bits` bytes
    flat = torch.nn.functional.pad(flat, (0, groups * 8 - n))
    code_shifts = torch.arange(bits, device=codes.device, dtype=torch.uint8)
    stream = (flat.view(groups, 8, 1) >> code_shifts) & 1  # (groups, 8 codes, bits)
    byte_shifts = torch.arange(8, device=codes.device, dtype=torch.uint8)
    stream = stream.reshape(groups, bits, 8) << byte_shifts  # regroup the bit stream by byte
    packed = stream.sum(dim=-1, dtype=torch.uint8).reshape(-1)
    nbytes = packed_nbytes(n, bits)
    # The last group can hold up to bits - 1 bytes past the last code: copy rather than
    # return a view, so that only ceil(n*bits/8) bytes stay alive for backward.
    return packed if packed.numel() == nbytes else packed[:nbytes].clone()


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack`: the first `numel` codes as a flat uint8 tensor."""
    check_bits(bits)
    if bits == 8:
        return packed[:numel]
    groups = -(-numel // 8)
    data = torch.nn.functional.pad(packed, (0, groups * bits - packed.numel()))
    byte_shifts = torch.arange(8, device=packed.device, dtype=torch.uint8)
    stream = (data.view(groups, bits, 1) >> byte_shifts) & 1  # (groups, bytes, 8 bits)
    code_shifts = torch.arange(bits, device=packed.device, dtype=torch.uint8)
    codes = stream.reshape(groups, 8, bits) << code_shifts
    return codes.sum(dim=-1, dtype=torch.uint8).reshape(-1)[:numel]
