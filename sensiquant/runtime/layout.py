"""Kernel weight layouts: which int4pack group a layer can run at, and the packed kernel's block layout (codes per
row in blocks of 32, every group zero-padded to whole blocks, 2/3/4/8 bits at their own width)."""

from __future__ import annotations

import torch

from ..format import groups

KERNEL_GROUPS = (256, 128, 64, 32)
BLOCK = 32  # codes per block of the packed layout



def kernel_group(in_features: int, group_size: int | None) -> int | None:
    """The largest int4pack group size that divides every group of the layer, tail included (None if none)."""
    g = groups.resolve_group_size(group_size, in_features)
    n_full, tail = divmod(in_features, g)
    sizes = {g} if n_full else set()
    if tail:
        sizes.add(tail)
    for kg in KERNEL_GROUPS:
        if all(s % kg == 0 for s in sizes):
            return kg
    return None


def int4pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def group_widths(in_features: int, group_size: int | None) -> list[int]:
    g = groups.resolve_group_size(group_size, in_features)
    n_full, tail = divmod(in_features, g)
    return [g] * n_full + ([tail] if tail else [])


def padded_in_features(in_features: int, group_size: int | None) -> int:
    """Codes per row in the packed layout: every group rounded up to whole blocks of 32."""
    return sum(-(-w // BLOCK) * BLOCK for w in group_widths(in_features, group_size))


def _pad_groups(codes: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(N, K) -> (N, Kp): every group zero-padded to a multiple of BLOCK columns."""
    pieces = []
    for piece in groups.split_groups(codes, group_size):  # (N, n, width)
        pad = (-piece.shape[-1]) % BLOCK
        if pad:
            piece = torch.cat([piece, piece.new_zeros(*piece.shape[:-1], pad)], dim=-1)
        pieces.append(piece.reshape(piece.shape[0], -1))
    return torch.cat(pieces, dim=1)


def to_kernel_layout(codes: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """uint8 codes (N, K) -> the packed kernel layout (N, Kp * bits / 8); see ``csrc/packed_kernels.cpp``."""
    n = codes.shape[0]
    c = _pad_groups(codes.to(torch.uint8), group_size).view(n, -1, BLOCK).to(torch.int32)
    if bits == 8:
        out = c
    elif bits == 4:
        out = c[..., :16] | (c[..., 16:] << 4)
    else:
        low = (c & 3).view(n, -1, 4, 8)
        out = low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)
        if bits == 3:
            high = ((c >> 2) & 1).view(n, -1, 4, 8) << torch.arange(8, dtype=torch.int32)
            out = torch.cat([out, high.sum(-1)], dim=-1)
    return out.to(torch.uint8).reshape(n, -1).contiguous()


def from_kernel_layout(packed: torch.Tensor, bits: int, in_features: int, group_size: int | None) -> torch.Tensor:
    """Inverse of :func:`to_kernel_layout` (padding dropped): uint8 codes (N, K)."""
    n = packed.shape[0]
    b = packed.view(n, -1, 4 * bits).to(torch.int32)
    if bits == 8:
        c = b
    elif bits == 4:
        c = torch.cat([b & 15, b >> 4], dim=-1)
    else:
        shifts = torch.arange(4, dtype=torch.int32).view(4, 1) * 2
        c = ((b[:, :, None, :8] >> shifts) & 3).reshape(n, -1, BLOCK)
        if bits == 3:
            high = (b[:, :, 8:12, None] >> torch.arange(8, dtype=torch.int32)) & 1
            c = c | (high.reshape(n, -1, BLOCK) << 2)
    flat = c.reshape(n, -1)
    cols, start = [], 0
    for w in group_widths(in_features, group_size):
        cols.append(flat[:, start:start + w])
        start += -(-w // BLOCK) * BLOCK
    return torch.cat(cols, dim=1).to(torch.uint8)
