"""sensiquant: post-training weight-only low-bit quantization that spends bits where the model is sensitive."""

from .alloc.plan import Plan, PlanLayer
from .api import evaluate_perplexity, plan, quantize, quantize_with_plan
from .checkpoint import load_quantized, save_quantized
from .config import HQQParams, LayerSpec, QuantConfig
from .errors import SensiquantError
from .eval.zeroshot import evaluate_zeroshot, run_lm_eval
from .gwq import GWQConfig, gwq_quantize
from .models import load_model
from .planning import PlanConfig, apply_plan, make_plan
from .quantize import QuantReport, quantize_model

__version__ = "0.1.0"

__all__ = [
    "GWQConfig",
    "HQQParams",
    "LayerSpec",
    "Plan",
    "PlanConfig",
    "PlanLayer",
    "QuantConfig",
    "QuantReport",
    "SensiquantError",
    "apply_plan",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "gwq_quantize",
    "load_model",
    "load_quantized",
    "make_plan",
    "plan",
    "quantize",
    "quantize_model",
    "quantize_with_plan",
    "run_lm_eval",
    "save_quantized",
]
