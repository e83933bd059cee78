"""Outlier-layer detection for SensiBoost and KurtBoost (arXiv 2503.06518).

Both methods look at one number per transformer layer along the depth of the model and boost (give a higher ladder
rung to) the layers where that number jumps relative to the layer before it:

* SensiBoost uses an activation-sensitivity score per layer and the *ratio* of adjacent layers, v[i] / v[i-1];
* KurtBoost uses the kurtosis of the layer's weights (:func:`pearson_kurtosis`) and the *difference*
  v[i] - v[i-1].

A layer is an outlier when the z-score of its change exceeds a threshold (3 by default). The z-score uses a trimmed
mean and standard deviation (the lowest and highest ``trim`` share of changes dropped) so that the very jumps we are
looking for do not inflate the spread and hide themselves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

CHANGE_MODES = ("ratio", "difference")


def pearson_kurtosis(w: torch.Tensor) -> float:
    """Pearson (non-excess) kurtosis E[(x - mu)^4] / sigma^4 of all entries of ``w``, computed in float64.

    Uses population moments (divide by n). A Gaussian gives 3, a Laplace 6, a uniform 1.8; heavy-tailed weight
    matrices (a few large outliers) give much more, which is what makes them hard to quantize with few bits.
    """
    if w.numel() == 0:
        raise ValueError("kurtosis of an empty tensor is undefined")
    x = w.detach().reshape(-1).to(torch.float64, copy=True)
    if not torch.isfinite(x).all():
        raise ValueError("kurtosis needs finite values (got inf or NaN)")
    x -= x.mean()
    x.square_()
    m2 = x.mean()
    if m2 <= 0:
        raise ValueError("kurtosis of a constant tensor is undefined (zero variance)")
    m4 = x.square_().mean()
    return float(m4 / (m2 * m2))


def trimmed_zscores(values: np.ndarray, trim: float = 0.05) -> np.ndarray:
    """z = (v - mean_t) / std_t, with mean_t and std_t (population, ddof=0) taken after dropping the lowest and the
    highest ``trim`` share of ``values`` (``int(trim * n)`` values from each end, as :func:`scipy.stats.trimboth`).

    All values are scored, trimmed ones included. When the trimmed values have (numerically) zero spread the
    z-scores are all zero: there is no scale to measure a deviation against. Note that this also hides a single jump
    in an otherwise perfectly constant profile; real sensitivity and kurtosis profiles are never exactly flat.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if v.size == 0:
        return np.zeros(0)
    if not np.isfinite(v).all():
        raise ValueError("z-scores need finite values (got inf or NaN)")
    cut = int(trim * v.size)
    kept = np.sort(v)[cut : v.size - cut]
    mean = kept.mean()
    std = kept.std()
    scale = np.abs(kept).max()
    if std == 0.0 or std <= 1e-12 * scale:
        return np.zeros_like(v)
    return (v - mean) / std


def adjacent_changes(values: Sequence[float] | np.ndarray, mode: str) -> np.ndarray:
    """Change of each layer's value relative to the previous layer: ``v[i] / v[i-1]`` ("ratio", SensiBoost) or
    ``v[i] - v[i-1]`` ("difference", KurtBoost).

    Layer 0 has no predecessor, so it is compared with its only neighbour the other way round: ``v[0] / v[1]`` or
    ``v[0] - v[1]``. This keeps layer 0 eligible (in LLMs it is often the most sensitive / most heavy-tailed layer),
    and a layer 0 in line with layer 1 still gets a neutral change (ratio ~1, difference ~0). Ratio mode needs
    strictly positive values. Fewer than two layers give no changes to compare: an all-neutral array is returned.
    """
    if mode not in CHANGE_MODES:
        raise ValueError(f"unknown change mode {mode!r}: choose one of {', '.join(CHANGE_MODES)}")
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.isfinite(v).all():
        raise ValueError("layer values must be finite (got inf or NaN)")
    neutral = 1.0 if mode == "ratio" else 0.0
    if v.size < 2:
        return np.full(v.size, neutral)
    if mode == "ratio":
        if (v <= 0).any():
            raise ValueError("ratio mode needs strictly positive layer values")
        changes = np.empty_like(v)
        changes[1:] = v[1:] / v[:-1]
        changes[0] = v[0] / v[1]
    else:
        changes = np.empty_like(v)
        changes[1:] = v[1:] - v[:-1]
        changes[0] = v[0] - v[1]
    return changes


def change_zscores(values: Sequence[float] | np.ndarray, mode: str, trim: float = 0.05) -> np.ndarray:
    """Trimmed z-score of every layer's :func:`adjacent_changes`: the score :func:`detect_outlier_layers` tests."""
    return trimmed_zscores(adjacent_changes(values, mode), trim)


def detect_outlier_layers(
    values: Sequence[float] | np.ndarray,
    mode: str,
    threshold: float = 3.0,
    top_m: int | None = None,
    trim: float = 0.05,
) -> list[int]:
    """Layers whose change from the previous layer is an upward outlier, most extreme first.

    Args:
        values: one score per layer in depth order (sensitivity for SensiBoost, weight kurtosis for KurtBoost).
        mode: "ratio" (SensiBoost) or "difference" (KurtBoost), see :func:`adjacent_changes`.
        threshold: flag layers whose trimmed z-score is strictly greater than this. Only upward jumps count: the
            layer right after a spike has a large negative change and is not flagged.
        top_m: keep at most this many layers (the largest z-scores); ``None`` keeps all.
        trim: share of changes trimmed from each end for the mean and std, see :func:`trimmed_zscores`.

    Returns:
        Layer indices sorted by z-score descending (ties by index).
    """
    if top_m is not None and top_m < 0:
        raise ValueError(f"top_m must be non-negative or None, got {top_m}")
    z = change_zscores(values, mode, trim)
    flagged = np.flatnonzero(z > threshold).tolist()
    flagged.sort(key=lambda i: (-z[i], i))
    return flagged if top_m is None else flagged[:top_m]
