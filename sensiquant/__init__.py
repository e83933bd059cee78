"""sensiquant: post-training weight-only low-bit quantization that spends bits where the model is sensitive."""

from .api import evaluate_perplexity, quantize
from .checkpoint import load_quantized, save_quantized
from .config import HQQParams, LayerSpec, QuantConfig
from .errors import SensiquantError
from .gwq import GWQConfig, gwq_quantize
from .models import load_model
from .quantize import QuantReport, quantize_model

__version__ = "0.1.0"

__all__ = [
    "GWQConfig",
    "HQQParams",
    "LayerSpec",
    "QuantConfig",
    "QuantReport",
    "SensiquantError",
    "evaluate_perplexity",
    "gwq_quantize",
    "load_model",
    "load_quantized",
    "quantize",
    "quantize_model",
    "save_quantized",
]
