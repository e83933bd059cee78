"""Half-quadratic quantization (HQQ, Badri & Shaji 2023), written from the paper, and the policy that makes it beat
RTN on our grids.

:func:`hqq_solve` minimises ``||W - dequant(quant(W))||_p^p`` (p < 1) per group by alternating a generalised
soft-threshold on the error with closed-form updates of the zero point (and, optionally, of the scale) while the
codes are re-rounded. It works on the group pieces of :mod:`sensiquant.format.groups`, so tail groups take part in
the same iterations. :func:`hqq_fit` is the policy: an integer-zero start, the solver with integer zeros, the
package's fractional-zero solution as a further candidate, and a per-group guard that keeps the candidate with the
lowest ``||e||^2 + w_b (sum e)^2`` (README, "HQQ defaults").
"""

from __future__ import annotations

import torch

from ..format.groups import split_like
from ..format.spec import HQQParams, LayerSpec


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding)."""
    mag = x.abs()
    if p == 1.0:
        return torch.sign(x) * (mag - 1.0 / beta).clamp_min(0.0)
    return mag.pow(p - 1.0).div_(beta).neg_().add_(mag).clamp_min_(0.0).copysign_(x)


def _codes_and_error(pieces, inv_scales, zeros, qmax) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each piece's codes under (inverse scale, zero) and the mean absolute dequantization error over all."""
    codes, total, count = [], 0.0, 0
    for w, s, z in zip(pieces, inv_scales, zeros):
        q = torch.mul(w, s).add_(z).round_().clamp_(0, qmax)
        total = total + torch.sub(q, z).div_(s).sub_(w).abs_().sum()
        codes.append(q)
        count += w.numel()
    return codes, total / count


def hqq_solve(
    pieces: list[torch.Tensor],
    inv_scales: list[torch.Tensor],
    zeros: list[torch.Tensor],
    bits: int,
    params: HQQParams,
    integer_zero: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Optimise (inverse scale, zero) of every group; ``q = round(w * inv_scale + zero)``.

    ``integer_zero`` keeps zeros on integers (rounded after each update) so that 0 stays exactly representable.
    With ``params.optimize_scale`` the dequantization scale also gets its least-squares update each iteration.
    Early stopping keeps the best iterate by mean absolute error over the whole matrix. The codes of each iterate
    are computed once, for its error and for the next update.
    """
    qmax = 2**bits - 1
    beta = params.beta
    zeros = [z.clone() for z in zeros]
    inv_scales = [s.clone() for s in inv_scales]
    codes, best = _codes_and_error(pieces, inv_scales, zeros, qmax)
    best_state = ([s.clone() for s in inv_scales], [z.clone() for z in zeros])
    for _ in range(params.iters):
        for i, w in enumerate(pieces):
            s, z, q = inv_scales[i], zeros[i], codes[i]
            target = torch.sub(w, shrink_lp(torch.sub(q, z).div_(s).neg_().add_(w), beta, params.lp_norm))
            z = torch.mean(torch.mul(target, s).neg_().add_(q), dim=-1, keepdim=True)
            if integer_zero:
                z = torch.round(z)
            if params.optimize_scale:
                centred = q - z
                norm = centred.square().sum(-1, keepdim=True).clamp_min_(1e-12)
                d = centred.mul_(target).sum(-1, keepdim=True).div_(norm)
                s = torch.where(d > 1e-8, 1.0 / d.clamp_min(1e-8), s)
            inv_scales[i], zeros[i] = s, z
        beta *= params.kappa
        codes, current = _codes_and_error(pieces, inv_scales, zeros, qmax)
        if current < best:
            best = current
            best_state = ([s.clone() for s in inv_scales], [z.clone() for z in zeros])
        elif params.early_stop:
            break
    return best_state


def group_error(pieces, scales, zeros, qmax, bias_weight: float = 0.0):
    """Per group, (out, n, 1) a piece: sum of squared errors + bias_weight * (sum of errors)^2."""
    out = []
    for p, s, z in zip(pieces, scales, zeros):
        e = (torch.round(p / s + z).clamp(0, qmax) - z) * s - p
        out.append(e.pow(2).sum(-1, keepdim=True) + bias_weight * e.sum(-1, keepdim=True).pow(2))
    return out


def hqq_fit(pieces, scales, zeros, spec: LayerSpec):
    """HQQ's (scales, zeros) per piece, starting from the min-max ``scales`` / ``zeros`` (integer when
    ``spec.round_zero``), with the candidates and guard of ``spec.hqq``."""
    qmax = 2**spec.bits - 1
    inv, opt = hqq_solve(pieces, [1.0 / s for s in scales], zeros, spec.bits, spec.hqq, spec.round_zero)
    candidates = [(scales, zeros), ([1.0 / s for s in inv], opt)]
    if spec.hqq.l2_guard and spec.hqq.fractional_candidate and spec.round_zero:
        plain = spec.hqq.replace(optimize_scale=False)
        inv, opt = hqq_solve(pieces, [1.0 / s for s in scales], zeros, spec.bits, plain, integer_zero=False)
        candidates.append(([1.0 / s for s in inv], opt))
    if not spec.hqq.l2_guard:
        return candidates[1]
    return _pick_per_group(pieces, candidates, qmax, spec.hqq.guard_bias_weight)


def _pick_per_group(pieces, candidates, qmax, bias_weight):
    """Per group, the candidate with the lowest guard error; the min-max start included."""
    errors = [torch.cat(group_error(pieces, sc, zc, qmax, bias_weight), 1) for sc, zc in candidates]
    best = torch.stack(errors).argmin(0)  # (out, n_groups, 1)
    scale = torch.stack([torch.cat(sc, 1) for sc, _ in candidates]).gather(0, best[None]).squeeze(0)
    zero = torch.stack([torch.cat(zc, 1) for _, zc in candidates]).gather(0, best[None]).squeeze(0)
    return split_like(scale.squeeze(-1), pieces), split_like(zero.squeeze(-1), pieces)
