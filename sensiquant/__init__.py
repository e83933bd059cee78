"""sensiquant: post-training weight-only low-bit quantization that spends bits where the model is sensitive."""

from . import calib, data, eval, format, io, methods, pipeline, planning, runtime  # noqa: F401  (sq.runtime...)
from .api import evaluate_perplexity, load_for_inference, plan, quantize, quantize_with_plan
from .calib import CalibConfig
from .errors import SensiquantError
from .eval.zeroshot import evaluate_zeroshot, run_lm_eval
from .format import HQQParams, LayerSpec
from .io import export_compressed_tensors, export_gguf, load_model, load_quantized, save_quantized, verify_checkpoint
from .io.hf_hook import install as _install_in_transformers
from .methods import GPTAQConfig, GPTQConfig, OutlierConfig, RoundConfig, SignRoundConfig
from .pipeline import QuantConfig, QuantReport, gptq, gwq, quantize_model, recipe
from .planning import Plan, PlanConfig, PlanLayer, apply_plan, make_plan
from .runtime import convert_to_fast

__version__ = "0.2.0"

_install_in_transformers()  # from_pretrained loads quant_method "sensiquant" (sensiquant/io/hf.py), registered lazily

__all__ = [
    "CalibConfig",
    "GPTAQConfig",
    "GPTQConfig",
    "HQQParams",
    "LayerSpec",
    "OutlierConfig",
    "Plan",
    "PlanConfig",
    "PlanLayer",
    "QuantConfig",
    "QuantReport",
    "RoundConfig",
    "SensiquantError",
    "SignRoundConfig",
    "apply_plan",
    "convert_to_fast",
    "evaluate_perplexity",
    "evaluate_zeroshot",
    "export_compressed_tensors",
    "export_gguf",
    "gptq",
    "gwq",
    "load_for_inference",
    "load_model",
    "load_quantized",
    "make_plan",
    "plan",
    "quantize",
    "quantize_model",
    "quantize_with_plan",
    "recipe",
    "run_lm_eval",
    "save_quantized",
    "verify_checkpoint",
]
