"""GPTQ (Frantar et al. 2022), written from the paper: quantize columns one at a time, pushing each column's error
onto the columns not yet quantized through the inverse Hessian of the layer's calibration inputs.

The grid is sensiquant's own: groups of ``spec.group_size`` input columns (shorter tail group included), each
group's (scale, zero) fitted by :func:`~sensiquant.methods.grid.fit_scale_zero` (RTN or HQQ) and rounded to FP16
as stored. Weights under an outlier mask are kept exactly and do not take part in the fit nor in error propagation
(as in SpQR). The result is an ordinary :class:`~sensiquant.format.QuantizedWeight`. Needs the layer's input
Hessian (``sensiquant.calib``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import SensiquantError
from ..format import ggml, groups
from ..format.qweight import MIN_SCALE, QuantizedWeight, encode, floor_scale
from ..format.spec import LayerSpec
from ..serialize import Config
from .base import register
from .grid import fit_scale_zero


@dataclass(frozen=True)
class GPTQConfig(Config):
    """GPTQ settings. ``act_order`` visits columns by descending Hessian diagonal (static groups); it won where it
    was measured (BENCHMARKS.md, "GWQ": 3-bit g128 with 1% |g| outliers), hence on by default."""

    damp: float = 0.01  # share of mean(diag H) added to the diagonal
    block_size: int = 128  # columns per lazy batch update
    act_order: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.damp, int | float) and self.damp >= 0):
            raise SensiquantError(f"GPTQ dampening must be a non-negative number, got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise SensiquantError(f"GPTQ block size must be a positive integer, got {self.block_size!r}")


def upper_cholesky_of_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, in float64 for stability.

    If H is still not positive definite the dampening is raised tenfold, a few times, before giving up.
    """
    mean_diag = float(torch.diagonal(h).double().mean())
    for attempt in range(4):
        # at most two float64 copies alive at a time (an 8960-wide Hessian is 642 MB in float64)
        damped = h.double()
        damped.diagonal().add_(damp * 10**attempt * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0:
            hinv = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0:
                return upper.float()
    raise ValueError("GPTQ: the Hessian is not positive definite even with extra dampening")


def _quant_dequant(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmax, lo=0) -> torch.Tensor:
    """Round to the grid and back, as affine.py does: ``(clamp(round(w/s + z), 0, qmax) - z) * s``; ``qmax`` may be
    a tensor of per-row tops, with ``lo`` a tensor of zeros alike (torch clamps to tensors or numbers, not both)."""
    return (torch.round(w / s + z).clamp(lo, qmax) - z) * s


def _stored_meta(w_group: torch.Tensor, one_group: LayerSpec, keep: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One group's (scale, zero) per row, fitted on ``w_group`` where ``keep`` is set and FP16-rounded as stored."""
    s, z = fit_scale_zero(w_group, one_group, keep)
    return s[:, 0].half().float().clamp_min(MIN_SCALE), z[:, 0].half().float()


def _dead_and_order(h: torch.Tensor, act_order: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inputs never active in calibration (zero diagonal), and the act-order column permutation (or None)."""
    dead = torch.diagonal(h) == 0
    if not act_order:
        return dead, None
    diag = torch.diagonal(h).clone()
    diag[dead] = 1.0
    return dead, torch.argsort(diag, descending=True)


def gptq_factor(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> torch.Tensor:
    """The upper Cholesky factor of the damped inverse Hessian that :func:`gptq_solve` would compute, for solving
    several specs (or row subsets) of one layer against the same Hessian without factoring it each time."""
    h = hessian.detach().float().clone()
    dead, perm = _dead_and_order(h, act_order)
    h[dead, dead] = 1.0
    if perm is not None:
        h = h[perm][:, perm]
    return upper_cholesky_of_inverse(h, damp)


def gptq_solve(w: torch.Tensor, hessian: torch.Tensor, spec: LayerSpec, outlier_mask: torch.Tensor | None = None,
               damp: float = 0.01, block_size: int = 128, act_order: bool = False, return_base: bool = False,
               asym_cross: torch.Tensor | None = None, alpha: float = 0.0,
               factor: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """The GPTQ pass itself: returns (w_final, scale, zero), and with ``return_base`` also ``base``.

    ``factor`` (from :func:`gptq_factor` with the same Hessian, ``damp`` and ``act_order``) skips the factoring.

    With ``asym_cross`` (GPTAQ's 2/n (X - X~)^T X~, see :mod:`sensiquant.methods.gptaq`) and ``alpha`` > 0, each
    column's weight also moves the columns not yet quantized by ``alpha * w_i P[i, j]`` with
    ``P = triu(C U^T, 1) U`` (U the upper Cholesky factor of H^-1), so that they absorb the drift of the
    quantized model's inputs; ``alpha = 0`` is GPTQ.

    ``w_final`` (out, in) holds GPTQ's dequantized values, and at the outlier positions the exact (error-updated)
    weights to keep in FP16; ``scale`` and ``zero`` (out, n_groups) are FP16-rounded values in float32. ``base``
    holds every column as it was just before it was rounded (the error-updated weights): rounding it to nearest
    gives GPTQ's codes, so block tuning (``methods.signround``) can start from GPTQ's solution.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out_features, n = w.shape
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in_features {n}")
    if outlier_mask is not None and tuple(outlier_mask.shape) != tuple(w.shape):
        raise ValueError(f"outlier mask shape {tuple(outlier_mask.shape)} does not match weight {tuple(w.shape)}")
    if block_size < 1:
        raise ValueError(f"block size must be positive, got {block_size}")

    device = w.device
    W = w.detach().float().clone()
    H = hessian.detach().to(device=device, dtype=torch.float32).clone()
    mask = (torch.zeros_like(W, dtype=torch.bool) if outlier_mask is None
            else outlier_mask.to(device=device, dtype=torch.bool))
    has_mask = bool(mask.any())
    qmax = 2**spec.bits - 1
    g = groups.resolve_group_size(spec.group_size, n)
    n_groups = groups.num_groups(n, spec.group_size)
    one_group = dataclasses.replace(spec, group_size=None)

    # Dead inputs (never active in calibration): nothing to fit against, so the weight is zeroed (outliers kept).
    dead, perm = _dead_and_order(H, act_order)
    if bool(dead.any()):
        H[dead, dead] = 1.0
        W[:, dead] = torch.where(mask[:, dead], W[:, dead], 0.0)

    scale = torch.zeros(out_features, n_groups, device=device)
    zero = torch.zeros(out_features, n_groups, device=device)

    def fit(j: int, w_group: torch.Tensor, m_group: torch.Tensor) -> None:
        """Fit group j's (scale, zero) on ``w_group``, excluding outliers, and round them as they are stored."""
        scale[:, j], zero[:, j] = _stored_meta(w_group, one_group, ~m_group if has_mask else None)

    gguf = spec.gguf is not None
    if gguf:
        # llama.cpp's blocks quantize a super-block's scales together: fit every group up front, on the original
        # columns, and solve against the scales and zeros exactly as stored;
        # each column's error weighted by its input's mean square (diag H), as llama.cpp's importance matrix
        # weights its search: SmolLM2 Q4_0 22.12 / 43.58 against 23.48 / 45.62 unweighted (BENCHMARKS.md)
        s, z = fit_scale_zero(W, spec, ~mask if has_mask else None, col_weights=torch.diagonal(H))
        _, scale, zero = ggml.store_meta(s, z, spec.gguf)
        scale = floor_scale(scale)
    if perm is not None:
        # Static groups: fit every group up front on the original columns so groups stay contiguous in the
        # stored layout, then visit columns by descending Hessian diagonal.
        if not gguf:
            scale, zero = static_meta(W, spec, mask if has_mask else None)
        W, H, mask = W[:, perm], H[perm][:, perm], mask[:, perm]
        group_of = (perm // g).tolist()
    else:
        group_of = [c // g for c in range(n)]

    Hinv = upper_cholesky_of_inverse(H, damp) if factor is None else factor.to(device=device, dtype=torch.float32)
    del H
    P = None
    if asym_cross is not None and alpha > 0:
        C = asym_cross.detach().to(device=device, dtype=torch.float32)
        C = C[perm][:, perm] if perm is not None else C.clone()
        C[:, dead if perm is None else dead[perm]] = 0.0
        P = alpha * torch.triu(C @ Hinv.t(), diagonal=1) @ Hinv
        del C
    U = torch.zeros_like(W) if return_base or P is not None else None  # each column just before it is rounded

    def quantize(col: int, wc: torch.Tensor) -> torch.Tensor:
        j = group_of[col]
        return _quant_dequant(wc, scale[:, j], zero[:, j], qmax)

    def refit(col: int, i: int, i1: int, i2: int, W1: torch.Tensor, Err1: torch.Tensor) -> None:
        if col % g == 0:
            # First column of a group: fit on the group's current weights. Columns past this block have not
            # received the block's lazy update yet, so apply the part accumulated so far to them here.
            end = min(col + g, n)
            cur = W1[:, i:min(end, i2) - i1]
            if end > i2:
                rest = W[:, i2:end] - Err1[:, :i] @ Hinv[i1:col, i2:end]
                cur = torch.cat([cur, rest], dim=1)
            fit(group_of[col], cur, mask[:, col:end])

    dynamic = not act_order and not gguf
    Q = _sweep(W, Hinv, quantize, mask if has_mask else None, block_size, refit if dynamic else None, U, P)

    if perm is not None:
        inverse = torch.argsort(perm)
        Q = Q[:, inverse]
        U = U[:, inverse] if return_base else None
    return (Q, scale, zero, U) if return_base else (Q, scale, zero)


def _sweep(W: torch.Tensor, Hinv: torch.Tensor, quantize, mask: torch.Tensor | None, block_size: int,
           refit=None, U: torch.Tensor | None = None, P: torch.Tensor | None = None) -> torch.Tensor:
    """GPTQ's column sweep over ``W`` (updated in place; columns in visiting order, ``Hinv`` permuted alike):
    each column is rounded by ``quantize(col, w_col)`` (kept where ``mask`` is set) and its error pushed onto the
    columns not yet visited, lazily per block of ``block_size`` columns. ``refit(col, i, i1, i2, W1, Err1)`` runs
    first at every column (dynamic groups); ``U`` receives each column just before rounding; ``P`` is GPTAQ's
    term. Returns the rounded columns."""
    n = W.shape[1]
    Q = torch.zeros_like(W)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if refit is not None:
                refit(col, i, i1, i2, W1, Err1)
            wc = W1[:, i]
            q = quantize(col, wc)
            if mask is not None:
                q = torch.where(mask[:, col], wc, q)
            Q[:, col] = q
            if U is not None:
                U[:, col] = wc
            err = (wc - q) / Hinv1[i, i]
            if P is not None:
                W1[:, i + 1:] += wc[:, None] * P[col, col + 1:i2][None, :]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += U[:, i1:i2] @ P[i1:i2, i2:]
    return Q


def static_meta(w: torch.Tensor, spec: LayerSpec, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of every group fitted up front on the original columns, outliers excluded, FP16-rounded as
    stored: the static groups of act-order GPTQ."""
    n = w.shape[1]
    g = groups.resolve_group_size(spec.group_size, n)
    one_group = dataclasses.replace(spec, group_size=None)
    scale = torch.zeros(w.shape[0], groups.num_groups(n, spec.group_size), device=w.device)
    zero = torch.zeros_like(scale)
    for j in range(scale.shape[1]):
        keep = None if mask is None else ~mask[:, j * g:(j + 1) * g]
        scale[:, j], zero[:, j] = _stored_meta(w[:, j * g:(j + 1) * g], one_group, keep)
    return scale, zero


@torch.no_grad()
def gptq_solve_many(w: torch.Tensor, hessian: torch.Tensor, specs: list[LayerSpec],
                    masks: list[torch.Tensor | None], damp: float = 0.01, block_size: int = 128,
                    factor: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Act-order GPTQ of the same rows ``w`` under several specs (bits, groups, outliers) in one sweep: the specs'
    rows are stacked, each with its own static scales and grid top, so one pass over the columns serves them all
    (the plan's error table). Returns each spec's dequantized rows, as :func:`gptq_solve` with ``act_order``
    gives them up to float summation order."""
    n = w.shape[1]
    dead, perm = _dead_and_order(hessian.detach().float(), True)
    W, cols, zeros, tops, keep = [], [], [], [], []
    for spec, mask in zip(specs, masks, strict=True):
        if spec.gguf is not None:
            raise ValueError("gptq_solve_many: GGUF rungs are solved one at a time (gptq_solve)")
        m = torch.zeros_like(w, dtype=torch.bool) if mask is None else mask.to(dtype=torch.bool)
        rows = torch.where(dead[None, :] & ~m, 0.0, w.float())
        scale, zero = static_meta(rows, spec, m if bool(m.any()) else None)
        group_of = torch.arange(n, device=w.device) // groups.resolve_group_size(spec.group_size, n)
        W.append(rows)
        cols.append(scale[:, group_of])
        zeros.append(zero[:, group_of])
        tops.append(torch.full((w.shape[0], 1), float(2**spec.bits - 1), device=w.device))
        keep.append(m)
    W, scale, zero, mask = (torch.cat(t)[:, perm] for t in (W, cols, zeros, keep))
    top = torch.cat(tops)[:, 0]
    floor = torch.zeros_like(top)
    if factor is None:
        factor = gptq_factor(hessian, damp, act_order=True)

    def quantize(col: int, wc: torch.Tensor) -> torch.Tensor:
        return _quant_dequant(wc, scale[:, col], zero[:, col], top, floor)

    Q = _sweep(W, factor.float(), quantize, mask if bool(mask.any()) else None, block_size)
    return list(Q[:, torch.argsort(perm)].split(w.shape[0]))


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, spec: LayerSpec, outlier_mask: torch.Tensor | None = None,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False,
                  asym_cross: torch.Tensor | None = None, alpha: float = 0.0) -> QuantizedWeight:
    """Quantize an (out, in) weight with GPTQ against ``hessian`` (``sensiquant.calib.accumulate_hessian``).

    ``spec`` sets bits, groups and the grid fit (RTN or HQQ); ``outlier_mask`` marks weights kept in FP16;
    ``damp`` is the share of mean(diag H) added to the diagonal; ``act_order`` visits columns by descending
    diag(H) with static groups. The codes are stored against the FP16 scale/zero exactly as ``quantize_weight`` does.
    """
    w_final, scale, zero = gptq_solve(w, hessian, spec, outlier_mask, damp, block_size, act_order,
                                      asym_cross=asym_cross, alpha=alpha)
    mask = None if outlier_mask is None else outlier_mask.to(device=w_final.device, dtype=torch.bool)
    return encode(w_final, scale, zero, spec, mask)


@register(GPTQConfig, "gptq", needs=("hessian",))
def _gptq(w, spec, config: GPTQConfig, stats, outlier_mask):
    return gptq_quantize(w, stats.hessian, spec, outlier_mask, damp=config.damp, block_size=config.block_size,
                         act_order=config.act_order)
