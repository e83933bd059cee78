"""Group layout along the input dimension of a weight matrix.

A matrix of shape (out, in) with group size g is cut into ``in // g`` full groups per row and, when g does not
divide ``in``, one shorter tail group of ``in % g`` columns. Quantizers work on 3-D "pieces" of shape
(out, n_groups, width): at most two pieces (the full groups and the tail), each reduced along its last axis.
"""

from __future__ import annotations

import math

import torch


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """Group width actually used: ``None`` or -1 mean one group per row (per-channel)."""
    if group_size is None or group_size == -1:
        return in_features
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group size must be a positive integer or -1 (per-channel), got {group_size!r}")
    return min(group_size, in_features)


def num_groups(in_features: int, group_size: int | None) -> int:
    """Groups per row, the tail group included."""
    return math.ceil(in_features / resolve_group_size(group_size, in_features))


def split_groups(w: torch.Tensor, group_size: int | None) -> list[torch.Tensor]:
    """(out, in) -> [(out, n_full, g)] plus [(out, 1, tail)] when g does not divide in."""
    out_features, in_features = w.shape
    g = resolve_group_size(group_size, in_features)
    n_full, tail = divmod(in_features, g)
    pieces = []
    if n_full:
        pieces.append(w[:, : n_full * g].reshape(out_features, n_full, g))
    if tail:
        pieces.append(w[:, n_full * g :].reshape(out_features, 1, tail))
    return pieces


def merge_groups(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_groups`."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in pieces], dim=1)


def split_like(per_group: torch.Tensor, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cut a per-group tensor (out, n_groups) into (out, n, 1) slices matching ``pieces``."""
    out, start = [], 0
    for p in pieces:
        n = p.shape[1]
        out.append(per_group[:, start : start + n].unsqueeze(-1))
        start += n
    return out
