"""Dense bit-packing of integer codes (1-8 bits) into uint8.

Every 8 codes of b bits become exactly b bytes (little-endian bit order), so a tensor of n codes takes
``ceil(n / 8) * b`` bytes for any b: 2-, 3- and 4-bit codes are stored without wasted bits.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that :func:`pack` produces for ``numel`` codes."""
    return math.ceil(numel / 8) * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ``packed_nbytes`` bytes."""
    _check_bits(bits)
    flat = codes.reshape(-1).to(torch.int64)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if bits == 8:
        return flat.to(torch.uint8)
    octets = flat.view(-1, 8)
    shifts = torch.arange(8, dtype=torch.int64, device=codes.device) * bits
    word = (octets << shifts).sum(dim=1, keepdim=True)  # 8*bits <= 32 bits used
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=codes.device) * 8
    return ((word >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes as uint8."""
    _check_bits(bits)
    if bits == 8:
        return packed[:numel]
    chunks = packed.view(-1, bits).to(torch.int64)
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=packed.device) * 8
    word = (chunks << byte_shifts).sum(dim=1, keepdim=True)
    shifts = torch.arange(8, dtype=torch.int64, device=packed.device) * bits
    codes = (word >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
