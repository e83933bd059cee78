"""The storage contract: how a quantized matrix is laid out, packed and counted. Tensor code only, no model code."""

from .accounting import bits_per_param, outlier_bits, storage_bits, stored_tensors
from .packing import SUPPORTED_BITS, pack, packed_nbytes, unpack
from .qweight import BlockOutliers, QuantizedWeight, SparseOutliers, encode
from .spec import GRIDS, HQQParams, LayerSpec

__all__ = ["GRIDS", "SUPPORTED_BITS", "BlockOutliers", "HQQParams", "LayerSpec", "QuantizedWeight", "SparseOutliers",
           "bits_per_param", "encode", "outlier_bits", "pack", "packed_nbytes", "storage_bits", "stored_tensors",
           "unpack"]
