"""Running quantized models: QuantLinear (the reference layer), FastQuantLinear and its CPU kernels (the C++
extension and PyTorch's int4pack), attention numerics, model walking, and speed measurement."""

from .attention import float32_head, use_fp32_attention
from .extension import build_extension, extension_available
from .fast import FastQuantLinear, convert_to_fast, quant_weight_bytes
from .qlinear import QuantLinear
from .speed import SpeedResult, greedy_generate, measure_speed, peak_rss_mb
from .walk import find_linears, model_size_bytes, set_module

__all__ = ["FastQuantLinear", "QuantLinear", "SpeedResult", "build_extension", "convert_to_fast", "extension_available",
           "find_linears", "float32_head", "greedy_generate", "measure_speed", "model_size_bytes", "peak_rss_mb",
           "quant_weight_bytes", "set_module", "use_fp32_attention"]
