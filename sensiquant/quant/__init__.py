"""Tensor-level quantization: no model code here, everything works on a bare (out, in) weight."""

from .accounting import bits_per_param, outlier_bits, storage_bits
from .affine import QuantizedWeight, SparseOutliers, quantize_weight
from .packing import SUPPORTED_BITS, pack, unpack

__all__ = [
    "QuantizedWeight",
    "SparseOutliers",
    "SUPPORTED_BITS",
    "bits_per_param",
    "outlier_bits",
    "pack",
    "quantize_weight",
    "storage_bits",
    "unpack",
]
