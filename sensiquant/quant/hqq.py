"""Half-quadratic quantization (HQQ, Badri & Shaji 2023), written from the paper.

Minimises ``||W - dequant(quant(W))||_p^p`` (p < 1) per group by alternating a generalised soft-threshold on the
error with closed-form updates of the zero point (and, optionally, of the scale) while the codes are re-rounded.
Works on the group pieces of :mod:`sensiquant.quant.groups`, so tail groups take part in the same iterations.
"""

from __future__ import annotations

import torch

from ..config import HQQParams


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of ``|x|^p / beta`` (generalised soft-thresholding)."""
    mag = x.abs()
    if p == 1.0:
        return torch.sign(x) * (mag - 1.0 / beta).clamp_min(0.0)
    return torch.sign(x) * (mag - mag.pow(p - 1.0) / beta).clamp_min(0.0)


def _mean_abs_error(pieces, inv_scales, zeros, qmax) -> torch.Tensor:
    total, count = 0.0, 0
    for w, s, z in zip(pieces, inv_scales, zeros):
        q = torch.round(w * s + z).clamp(0, qmax)
        total = total + (w - (q - z) / s).abs().sum()
        count += w.numel()
    return total / count


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
    Early stopping keeps the best iterate by mean absolute error over the whole matrix.
    """
    qmax = 2**bits - 1
    beta = params.beta
    zeros = [z.clone() for z in zeros]
    inv_scales = [s.clone() for s in inv_scales]
    best = _mean_abs_error(pieces, inv_scales, zeros, qmax)
    best_state = ([s.clone() for s in inv_scales], [z.clone() for z in zeros])
    for _ in range(params.iters):
        for i, w in enumerate(pieces):
            s, z = inv_scales[i], zeros[i]
            q = torch.round(w * s + z).clamp(0, qmax)
            target = w - shrink_lp(w - (q - z) / s, beta, params.lp_norm)
            z = torch.mean(q - target * s, dim=-1, keepdim=True)
            if integer_zero:
                z = torch.round(z)
            if params.optimize_scale:
                centred = q - z
                norm = (centred * centred).sum(-1, keepdim=True).clamp_min(1e-12)
                d = (centred * target).sum(-1, keepdim=True) / norm
                s = torch.where(d > 1e-8, 1.0 / d.clamp_min(1e-8), s)
            inv_scales[i], zeros[i] = s, z
        beta *= params.kappa
        current = _mean_abs_error(pieces, inv_scales, zeros, qmax)
        if current < best:
            best = current
            best_state = ([s.clone() for s in inv_scales], [z.clone() for z in zeros])
        elif params.early_stop:
            break
    return best_state
