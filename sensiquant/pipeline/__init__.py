"""The quantization pipeline: QuantConfig, the one driver, named recipes, and the report."""

from .config import DEFAULT_SKIP, QuantConfig
from .driver import quantize_model
from .recipes import GWQ_SPEC, RECIPES, gptq, gwq, recipe
from .report import LayerReport, QuantReport

__all__ = ["DEFAULT_SKIP", "GWQ_SPEC", "RECIPES", "LayerReport", "QuantConfig", "QuantReport", "gptq", "gwq",
           "quantize_model", "recipe"]
