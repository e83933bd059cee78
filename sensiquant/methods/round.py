"""Round to nearest on the layer's fitted grid: RTN with ``grid="rtn"`` (min-max), HQQ with ``grid="hqq"``. No
calibration. :func:`quantize_weight` is the tensor-level entry point."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..format.qweight import QuantizedWeight, encode
from ..format.spec import LayerSpec
from ..serialize import Config
from .base import register
from .grid import fit_scale_zero


@dataclass(frozen=True)
class RoundConfig(Config):
    """Round every weight to the nearest code of its group's (scale, zero); the grid comes from the LayerSpec."""


def quantize_weight(w: torch.Tensor, spec: LayerSpec, outlier_mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize an (out, in) weight matrix as ``spec`` says; ``outlier_mask`` marks weights kept in FP16."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    fit_mask = None if outlier_mask is None else ~outlier_mask
    scale, zero = fit_scale_zero(w, spec, fit_mask)
    return encode(w, scale, zero, spec, outlier_mask)


@register(RoundConfig, "round")
def _round(w, spec, config, stats, outlier_mask):
    return quantize_weight(w, spec, outlier_mask)
