"""Grid fit: each group's (scale, zero) for a :class:`~sensiquant.format.LayerSpec`, by min-max (``grid="rtn"``) or
by HQQ's solver and guard (``grid="hqq"``). Weights under an outlier mask take no part in the fit."""

from __future__ import annotations

import torch

from ..format import groups
from ..format.ggml import ggml_type
from ..format.qweight import MIN_SCALE, floor_scale
from ..format.spec import LayerSpec
from .hqq import hqq_fit


def min_max(pieces, qmax):
    """Min-max scale and zero per group, (out, n, 1) each.

    A (nearly) constant group, whose spread is below 1/1024 of its magnitude, gets the grid from 0 to its value
    instead (zero at code 0, or at code qmax for a negative group; exact for a constant): a zero far outside the
    code range, which a tight grid would need, is exact in FP16 but takes the whole range of its 8-bit meta group
    and ruins its 127 neighbours' zeros (BENCHMARKS.md, "The same comparison on Qwen2.5-Coder-0.5B")."""
    scales, zeros = [], []
    for p in pieces:
        lo, hi = p.amin(-1, keepdim=True), p.amax(-1, keepdim=True)
        mag = torch.maximum(lo.abs(), hi.abs())
        flat = (hi - lo) / qmax < mag / 1024  # never straddles 0 (unless all zero): |lo|, |hi| <= hi - lo there
        s = torch.where(flat, mag / qmax, (hi - lo) / qmax).clamp_min(MIN_SCALE)
        scales.append(s)
        zeros.append(torch.where(flat, torch.where(hi < 0, float(qmax), 0.0), -lo / s))
    return scales, zeros


def symmetric_scale(p: torch.Tensor, zero: int, search: bool = True, weights: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """Scale (out, n, 1) of a symmetric grid ``(q - zero) * s``, q in [0, 2 * zero): the entry of largest magnitude
    maps to ``-zero`` (so ``s`` takes its sign, as llama.cpp's Q4_0 does). With ``search``, 19 nearby reciprocal
    steps are tried, each with its least-squares scale for the codes it gives, and the lowest squared error kept;
    ``weights`` (broadcast to ``p``, e.g. the inputs' mean squares per column) weight that error."""
    amax = torch.gather(p, -1, p.abs().argmax(-1, keepdim=True))
    safe = torch.where(amax == 0, 1.0, amax)
    best = amax / -zero
    if not search:
        return best
    wt = torch.ones_like(p) if weights is None else weights.expand_as(p)
    best_err = _sym_error(p, best, zero, wt)
    for k in range(-9, 10):
        iscale = -(zero + 0.1 * k) / safe
        levels = torch.round(p * iscale).clamp(-zero, zero - 1)
        l2 = (wt * levels * levels).sum(-1, keepdim=True)
        s = torch.where(l2 > 0, (wt * p * levels).sum(-1, keepdim=True) / l2.clamp_min(1e-30), best)
        err = _sym_error(p, s, zero, wt)
        better = err < best_err
        best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return torch.where(amax == 0, 0.0, best)


def asymmetric_search(p: torch.Tensor, qmax: int, weights: torch.Tensor, nonpositive_min: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) (out, n, 1) of ``(q - zero) * scale``, q in [0, qmax], minimising the ``weights``-weighted
    squared error: 21 code assignments from steps near (max - min) / qmax, each with its weighted least-squares
    scale and offset, the best kept (llama.cpp's search for its K-types, written for tensors). With
    ``nonpositive_min`` code 0 may not sit above zero (K-types store the min as a non-negative offset)."""
    lo, hi = p.amin(-1, keepdim=True), p.amax(-1, keepdim=True)
    if nonpositive_min:
        lo = lo.clamp_max(0)
    width = (hi - lo).clamp_min(1e-30)
    wt = weights.expand_as(p)
    sw = wt.sum(-1, keepdim=True)
    swx = (wt * p).sum(-1, keepdim=True)
    best_s = (width / qmax).clamp_min(MIN_SCALE)
    best_m = lo
    best_err = _asym_error(p, best_s, best_m, qmax, wt)
    for k in range(21):
        levels = torch.round((p - lo) * ((qmax - 1 + 0.1 * k) / width)).clamp(0, qmax)
        swl = (wt * levels).sum(-1, keepdim=True)
        swl2 = (wt * levels * levels).sum(-1, keepdim=True)
        swlx = (wt * levels * p).sum(-1, keepdim=True)
        det = sw * swl2 - swl * swl
        ok = det > 0
        s = torch.where(ok, (sw * swlx - swl * swx) / torch.where(ok, det, 1.0), best_s)
        m = torch.where(ok, (swl2 * swx - swl * swlx) / torch.where(ok, det, 1.0), best_m)
        if nonpositive_min:  # a fitted offset above zero: refit the scale alone with the offset at zero
            above = m > 0
            s = torch.where(above, swlx / swl2.clamp_min(1e-30), s)
            m = torch.where(above, 0.0, m)
        s = s.clamp_min(MIN_SCALE)
        err = _asym_error(p, s, m, qmax, wt)
        better = err < best_err
        best_s, best_m, best_err = (torch.where(better, s, best_s), torch.where(better, m, best_m),
                                    torch.where(better, err, best_err))
    return best_s, -best_m / best_s


def _asym_error(p, s, m, qmax, wt):
    q = torch.round((p - m) / s).clamp(0, qmax)
    return (wt * (p - (q * s + m)) ** 2).sum(-1, keepdim=True)


def _sym_error(p, s, zero, wt):
    q = torch.round(p / floor_scale(s)).clamp(-zero, zero - 1)
    return (wt * (p - q * s) ** 2).sum(-1, keepdim=True)


def fit_scale_zero(w: torch.Tensor, spec: LayerSpec, fit_mask: torch.Tensor | None = None,
                   col_weights: torch.Tensor | None = None):
    """Per-group (scale, zero), each (out, n_groups), fitted on the weights where ``fit_mask`` is True.

    Weights outside the mask (outliers kept in FP16) are replaced by their group's mean of the fitted weights so
    they do not widen the min-max range nor pull the HQQ zero point. ``col_weights`` (in_features,), e.g. the
    Hessian diagonal, weight each column's error in the searched scales (and mins) of GGUF grids.
    """
    qmax = 2**spec.bits - 1
    w = w.float()
    if fit_mask is not None and not bool(fit_mask.all()):
        w = _fill_excluded(w, fit_mask, spec.group_size)
    pieces = groups.split_groups(w, spec.group_size)
    if spec.gguf is not None and ggml_type(spec.gguf).symmetric:
        zero = ggml_type(spec.gguf).zero
        cw = [None] * len(pieces) if col_weights is None else \
            groups.split_groups(col_weights.float().reshape(1, -1), spec.group_size)
        scales = [symmetric_scale(p, zero, search=spec.grid == "hqq", weights=c) for p, c in zip(pieces, cw)]
        return groups.merge_groups(scales), torch.full_like(groups.merge_groups(scales), float(zero))
    if spec.gguf is not None and col_weights is not None:
        cw = groups.split_groups(col_weights.float().reshape(1, -1), spec.group_size)
        fits = [asymmetric_search(p, qmax, c, nonpositive_min=bool(ggml_type(spec.gguf).sub_bits))
                for p, c in zip(pieces, cw)]
        return groups.merge_groups([f[0] for f in fits]), groups.merge_groups([f[1] for f in fits])
    scales, zeros = min_max(pieces, qmax)
    if spec.round_zero:
        zeros = [torch.round(z) for z in zeros]
    if spec.grid == "hqq":
        scales, zeros = hqq_fit(pieces, scales, zeros, spec)
    if spec.gguf is not None and ggml_type(spec.gguf).sub_bits:
        scales, zeros = _code_zero_at_most_zero(pieces, scales, zeros, qmax)
    return groups.merge_groups(scales), groups.merge_groups(zeros)


def _code_zero_at_most_zero(pieces, scales, zeros, qmax):
    """K-types store a group's min as a non-negative offset: code 0 cannot sit above 0. A group fitted with it
    above 0 (all its weights positive) is refitted from 0 to its largest weight, as llama.cpp does."""
    out_s, out_z = [], []
    for p, s, z in zip(pieces, scales, zeros):
        above = z < 0
        top = (p.amax(-1, keepdim=True) / qmax).clamp_min(MIN_SCALE)
        out_s.append(torch.where(above, top, s))
        out_z.append(torch.where(above, 0.0, z))
    return out_s, out_z


def _fill_excluded(w, fit_mask, group_size):
    pieces = groups.split_groups(w, group_size)
    masks = groups.split_groups(fit_mask, group_size)
    filled = []
    for p, m in zip(pieces, masks):
        m = m.float()
        mean = (p * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1.0)
        filled.append(torch.where(m.bool(), p, mean))
    return groups.merge_groups(filled)
