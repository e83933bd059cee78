"""The quantization pipeline: QuantConfig, the one driver, named recipes and presets, block tuning, and the report."""

from .config import DEFAULT_SKIP, QuantConfig
from .driver import quantize_model
from .recipes import GWQ_SPEC, PRESETS, RECIPES, gptq, gwq, preset, recipe
from .report import LayerReport, QuantReport

__all__ = ["DEFAULT_SKIP", "GWQ_SPEC", "PRESETS", "RECIPES", "LayerReport", "QuantConfig", "QuantReport", "gptq",
           "gwq", "preset", "quantize_model", "recipe"]
