"""Grid fit: each group's (scale, zero) for a :class:`~sensiquant.format.LayerSpec`, by min-max (``grid="rtn"``) or
by HQQ's solver and guard (``grid="hqq"``). Weights under an outlier mask take no part in the fit."""

from __future__ import annotations

import torch

from ..format import groups
from ..format.qweight import MIN_SCALE
from ..format.spec import LayerSpec
from .hqq import hqq_fit


def min_max(pieces, qmax):
    """Min-max scale and zero per group, (out, n, 1) each."""
    scales, zeros = [], []
    for p in pieces:
        lo, hi = p.amin(-1, keepdim=True), p.amax(-1, keepdim=True)
        # the floor keeps |zero| <= 1024 (exact in FP16) for constant or near-constant groups
        floor = (torch.maximum(lo.abs(), hi.abs()) / 1024).clamp_min(MIN_SCALE)
        s = torch.maximum((hi - lo) / qmax, floor)
        scales.append(s)
        zeros.append(-lo / s)
    return scales, zeros


def fit_scale_zero(w: torch.Tensor, spec: LayerSpec, fit_mask: torch.Tensor | None = None):
    """Per-group (scale, zero), each (out, n_groups), fitted on the weights where ``fit_mask`` is True.

    Weights outside the mask (outliers kept in FP16) are replaced by their group's mean of the fitted weights so
    they do not widen the min-max range nor pull the HQQ zero point.
    """
    qmax = 2**spec.bits - 1
    w = w.float()
    if fit_mask is not None and not bool(fit_mask.all()):
        w = _fill_excluded(w, fit_mask, spec.group_size)
    pieces = groups.split_groups(w, spec.group_size)
    scales, zeros = min_max(pieces, qmax)
    if spec.round_zero:
        zeros = [torch.round(z) for z in zeros]
    if spec.grid == "hqq":
        scales, zeros = hqq_fit(pieces, scales, zeros, spec)
    return groups.merge_groups(scales), groups.merge_groups(zeros)


def _fill_excluded(w, fit_mask, group_size):
    pieces = groups.split_groups(w, group_size)
    masks = groups.split_groups(fit_mask, group_size)
    filled = []
    for p, m in zip(pieces, masks):
        m = m.float()
        mean = (p * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
        filled.append(torch.where(m.bool(), p, mean))
    return groups.merge_groups(filled)
