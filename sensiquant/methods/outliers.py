"""Outlier selection: per-weight saliency scores and the masks of weights kept exactly in FP16 (GWQ keeps the top
~1% by |gradient|). Tensor math only: the statistics (gradients, input Hessians, input norms) are gathered by
``sensiquant.calib`` and passed in; :data:`SALIENCY_NEEDS` says which each score needs.

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

from dataclasses import dataclass

import torch

from ..errors import SensiquantError
from ..serialize import Config
from .base import LayerStats
from .gptq import upper_cholesky_of_inverse

# the LayerStats fields each saliency needs
SALIENCY_NEEDS: dict[str, tuple[str, ...]] = {
    "grad": ("grad_abs_sum",), "grad_weight": ("grad_abs_sum",), "fisher": ("grad_sq_sum",), "hessian": ("hessian",),
    "activation": ("input_norm",), "magnitude": (), "random": (),
}
SALIENCIES = tuple(SALIENCY_NEEDS)
GRADIENT_SALIENCIES = tuple(k for k, v in SALIENCY_NEEDS.items() if v and v[0].startswith("grad"))
SCOPES = ("matrix", "global")


@dataclass(frozen=True)
class OutlierConfig(Config):
    """How outliers are chosen for the layers whose LayerSpec has ``outlier_ratio > 0``."""

    saliency: str = "grad"
    scope: str = "matrix"  # "matrix": top ratio of every matrix; "global": of all matrices together
    damp: float = 0.01  # the hessian (OBS) score's dampening, share of mean diag(H)
    seed: int = 0  # the random score's generator

    def __post_init__(self) -> None:
        if self.saliency not in SALIENCIES:
            raise SensiquantError(f"unknown saliency {self.saliency!r}: choose one of {', '.join(SALIENCIES)}")
        if self.scope not in SCOPES:
            raise SensiquantError(f"outlier scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    @property
    def needs(self) -> frozenset[str]:
        return frozenset(SALIENCY_NEEDS[self.saliency])


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
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
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


def select_outliers(weights: dict[str, torch.Tensor], ratios: dict[str, float], config: OutlierConfig,
                    stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
    """Outlier mask of every weight with a ratio > 0: the top ratio of its own scores (matrix scope), or of all
    scores normalised per matrix (global scope, which needs one ratio for all)."""
    weights = {name: w for name, w in weights.items() if ratios[name] > 0}
    if not weights:
        return {}
    generator = torch.Generator().manual_seed(config.seed)
    scores = {}
    for name, w in weights.items():
        st = stats.get(name) or LayerStats()
        scores[name] = saliency_scores(config.saliency, w, grad_abs_sum=st.grad_abs_sum, grad_sq_sum=st.grad_sq_sum,
                                       hessian=st.hessian, input_norm=st.input_norm, damp=config.damp,
                                       generator=generator)
    if config.scope == "matrix":
        return {name: top_mask(s, ratios[name]) for name, s in scores.items()}
    shares = {ratios[name] for name in weights}
    if len(shares) != 1:
        raise ValueError(f"global outlier scope needs one outlier ratio for every layer, got {sorted(shares)}")
    # normalise per matrix so that scores of differently scaled matrices compete fairly
    normalised = {name: s.float() / s.float().mean().clamp_min(1e-30) for name, s in scores.items()}
    threshold = global_threshold(list(normalised.values()), shares.pop())
    return {name: s >= threshold for name, s in normalised.items()}
