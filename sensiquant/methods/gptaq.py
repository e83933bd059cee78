"""GPTAQ (asymmetric calibration, "GPTQ v2"; Li et al. 2025), written from its objective: the quantized layer on
the quantized model's inputs X~ should reproduce the full-precision layer on the full-precision model's inputs X,

    min_Q || X W^T - X~ Q^T ||^2 = || (W - Q) X~^T + W (X - X~)^T ||^2.

GPTQ's column-by-column solve gets one more term: besides the rounding error, each column's weight pushes the
columns not yet quantized by ``alpha * w_i P[i, j]`` with ``P = triu(C U^T, 1) U``, where C = (X - X~)^T X~ and U
is the upper Cholesky factor of H^-1 (H = X~^T X~). ``alpha`` damps that push; the authors use 0.25, and the
unscaled least-squares shift W C H^-1 overfits the calibration windows badly (BENCHMARKS.md). Needs the layer's
quantized-stream Hessian and the cross term (``sensiquant.calib``, block by block with both streams).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SensiquantError
from ..format.qweight import QuantizedWeight
from ..format.spec import LayerSpec
from .base import register
from .gptq import GPTQConfig, gptq_quantize, gptq_solve


@dataclass(frozen=True)
class GPTAQConfig(GPTQConfig):
    """GPTQ settings plus ``alpha``, the weight of the asymmetric term (0 gives GPTQ)."""

    alpha: float = 0.25

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.alpha, int | float) and self.alpha >= 0):
            raise SensiquantError(f"GPTAQ alpha must be a non-negative number, got {self.alpha!r}")


def _checked(w: torch.Tensor, cross: torch.Tensor, config: GPTAQConfig | None) -> GPTAQConfig:
    n = w.shape[-1]
    if tuple(cross.shape) != (n, n):
        raise ValueError(f"cross term shape {tuple(cross.shape)} does not match in_features {n}")
    return config or GPTAQConfig()


def gptaq_solve(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, spec: LayerSpec,
                outlier_mask: torch.Tensor | None = None, config: GPTAQConfig | None = None,
                return_base: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`~sensiquant.methods.gptq.gptq_solve` with GPTAQ's asymmetric term; ``hessian`` is 2/n X~^T X~ and
    ``cross`` 2/n (X - X~)^T X~, both (in, in)."""
    config = _checked(w, cross, config)
    return gptq_solve(w, hessian, spec, outlier_mask, config.damp, config.block_size, config.act_order,
                      return_base, asym_cross=cross, alpha=config.alpha)


def gptaq_quantize(w: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, spec: LayerSpec,
                   outlier_mask: torch.Tensor | None = None, config: GPTAQConfig | None = None) -> QuantizedWeight:
    """Quantize an (out, in) weight with GPTAQ; stored exactly as GPTQ stores its result."""
    config = _checked(w, cross, config)
    return gptq_quantize(w, hessian, spec, outlier_mask, config.damp, config.block_size, config.act_order,
                         asym_cross=cross, alpha=config.alpha)


@register(GPTAQConfig, "gptaq", needs=("hessian", "asym_cross"))
def _gptaq(w, spec, config: GPTAQConfig, stats, outlier_mask):
    return gptaq_quantize(w, stats.hessian, stats.asym_cross, spec, outlier_mask, config)
