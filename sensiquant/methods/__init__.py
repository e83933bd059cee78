"""Quantization methods, tensor math only: each takes (weight, LayerSpec, statistics, outlier mask) and returns a
:class:`~sensiquant.format.QuantizedWeight`. ``RoundConfig`` (RTN / HQQ grids), ``GPTQConfig``, ``GPTAQConfig``;
outlier selection; block-output tuning of their rounding (``SignRoundConfig``, run block by block by the pipeline)."""

from .base import (
           STATISTICS,
           LayerStats,
           method_from_dict,
           method_name,
           method_to_dict,
           needed_statistics,
           quantize_layer,
)
from .gptaq import GPTAQConfig, gptaq_quantize, gptaq_solve
from .gptq import GPTQConfig, gptq_quantize
from .grid import fit_scale_zero
from .outliers import SALIENCIES, OutlierConfig, saliency_scores, select_outliers, top_mask
from .round import RoundConfig, quantize_weight
from .signround import SignRoundConfig, sign_round, start_point

MethodConfig = RoundConfig | GPTQConfig | GPTAQConfig

__all__ = ["SALIENCIES", "STATISTICS", "GPTAQConfig", "GPTQConfig", "LayerStats", "MethodConfig", "OutlierConfig",
           "RoundConfig", "SignRoundConfig", "fit_scale_zero", "gptaq_quantize", "gptaq_solve", "gptq_quantize",
           "method_from_dict", "method_name", "method_to_dict", "needed_statistics", "quantize_layer",
           "quantize_weight", "saliency_scores", "select_outliers", "sign_round", "start_point", "top_mask"]
