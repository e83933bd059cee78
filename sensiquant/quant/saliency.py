"""Per-weight saliency scores and the outlier masks they select. Tensor math only: the statistics (gradients,
input Hessians, input norms) are gathered elsewhere and passed in.

Scores, higher = more important to keep exact:
    grad          sum_i |g_i|                      (GWQ: first-order gradient magnitude)
    grad_weight   |w| * sum_i |g_i|                (first-order Taylor |g w|)
    fisher        w^2 * sum_i g_i^2                (empirical Fisher / second-order Taylor)
    hessian       w^2 / [H^-1]_jj                  (OBS / SpQR, H = 2 X^T X of the layer inputs)
    activation    |w| * ||x_j||                    (AWQ-like)
    magnitude     |w|
    random        uniform noise (seeded)
"""

from __future__ import annotations

import torch

from .gptq import upper_cholesky_of_inverse

SALIENCIES = ("grad", "grad_weight", "fisher", "hessian", "activation", "magnitude", "random")
GRADIENT_SALIENCIES = ("grad", "grad_weight", "fisher")


def saliency_scores(
    kind: str,
    w: torch.Tensor,
    grad_abs_sum: torch.Tensor | None = None,
    grad_sq_sum: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    input_norm: torch.Tensor | None = None,
    damp: float = 0.01,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Score every weight of an (out, in) matrix; the statistics each kind needs must be given."""
    w = w.float()
    if kind == "grad":
        return _need(grad_abs_sum, kind, "grad_abs_sum").float()
    if kind == "grad_weight":
        return w.abs() * _need(grad_abs_sum, kind, "grad_abs_sum").float()
    if kind == "fisher":
        return w.pow(2) * _need(grad_sq_sum, kind, "grad_sq_sum").float()
    if kind == "hessian":
        h = _need(hessian, kind, "hessian").float().clone()
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1.0
        upper = upper_cholesky_of_inverse(h, damp)  # H^-1 = U^T U, so diag(H^-1) = column sums of U^2
        return w.pow(2) / upper.pow(2).sum(0).unsqueeze(0)
    if kind == "activation":
        return w.abs() * _need(input_norm, kind, "input_norm").float().unsqueeze(0)
    if kind == "magnitude":
        return w.abs()
    if kind == "random":
        return torch.rand(w.shape, generator=generator)
    raise ValueError(f"unknown saliency {kind!r}: choose one of {', '.join(SALIENCIES)}")


def _need(x, kind, name):
    if x is None:
        raise ValueError(f"saliency {kind!r} needs {name}")
    return x


def top_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Boolean mask of the round(ratio * numel) highest scores (ties broken by position)."""
    k = round(ratio * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores.reshape(-1).float(), k, sorted=False).indices] = True
    return mask.view(scores.shape)


def global_threshold(scores: list[torch.Tensor], ratio: float) -> float:
    """Score above which the top ``ratio`` of all weights of all matrices lie (for a global outlier budget).

    Scores are normalised per matrix by the caller when matrices are not comparable.
    """
    flat = torch.cat([s.reshape(-1).float() for s in scores])
    k = round(ratio * flat.numel())
    if k == 0:
        return float("inf")
    return float(torch.topk(flat, k, sorted=True).values[-1])
