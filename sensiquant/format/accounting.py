"""Exact storage accounting. One description of what a quantized matrix stores, used by the CLI, the reports, the
checkpoint writer and the checkpoint reader alike.

Counts every stored bit of a quantized matrix: packed codes (padded to whole bytes as packed), scales and zeros
(FP16, or 8-bit codes plus an FP16 scale and zero per meta group), and outliers: FP16 values in CSR form with the
smallest index dtypes that fit, or block residuals (a count per block, an offset and a residual code per outlier,
one FP16 residual scale).
"""

from __future__ import annotations

import math

import torch

from .ggml import row_bytes
from .groups import num_groups
from .packing import packed_nbytes
from .qweight import OUTLIER_BLOCK, index_dtype
from .spec import LayerSpec


def stored_tensors(shape: tuple[int, int], spec: LayerSpec, n_outliers: int | None = None
                   ) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every tensor a quantized (out, in) matrix stores (the names of
    :meth:`QuantizedWeight.to_tensors`): packed codes, FP16 scales/zeros or their 8-bit codes with an FP16 scale and
    zero per meta group, and outliers in ``spec.outlier_format``: CSR with the smallest index dtypes, or block
    residuals. The checkpoint reader checks files against it; :func:`storage_bits` counts it.

    ``n_outliers`` defaults to ``round(outlier_ratio * numel)``, the count the outlier selection keeps.
    """
    out_features, in_features = shape
    numel = out_features * in_features
    if n_outliers is None:
        n_outliers = round(spec.outlier_ratio * numel)
    if spec.gguf is not None:  # llama.cpp blocks: codes and scales together, no outliers
        return {"qweight": (torch.uint8, (out_features * row_bytes(spec.gguf, in_features),))}
    n_meta = out_features * num_groups(in_features, spec.group_size)
    tensors = {"qweight": (torch.uint8, (packed_nbytes(numel, spec.bits),))}
    for kind in ("scale", "zero"):
        if spec.quant_meta:
            n_meta_groups = math.ceil(n_meta / spec.meta_group_size)
            tensors[kind + "_q"] = (torch.uint8, (packed_nbytes(n_meta, 8),))
            tensors[kind + "_qscale"] = (torch.float16, (n_meta_groups,))
            tensors[kind + "_qzero"] = (torch.float16, (n_meta_groups,))
        else:
            tensors[kind] = (torch.float16, (out_features, n_meta // out_features))
    if n_outliers and spec.outlier_format == "block":
        tensors["outlier_counts"] = (torch.uint8, (math.ceil(numel / OUTLIER_BLOCK),))
        tensors["outlier_offsets"] = (torch.uint8, (n_outliers,))
        tensors["outlier_codes"] = (torch.int8, (n_outliers,))
        tensors["outlier_scale"] = (torch.float16, (1,))
    elif n_outliers:
        tensors["outlier_values"] = (torch.float16, (n_outliers,))
        tensors["outlier_col_idx"] = (index_dtype(in_features - 1), (n_outliers,))
        tensors["outlier_row_ptr"] = (index_dtype(n_outliers), (out_features + 1,))
    return tensors


def _bits(tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    return sum(8 * math.prod(shape) * dtype.itemsize for dtype, shape in tensors.values())


def outlier_bits(shape: tuple[int, int], nnz: int, outlier_format: str = "csr") -> int:
    """Stored bits of ``nnz`` outliers in ``outlier_format``: FP16 values + column indices + row pointers (CSR), or
    block counts + offsets + residual codes + the residual scale (block)."""
    tensors = stored_tensors(shape, LayerSpec(outlier_format=outlier_format), nnz)
    return _bits({k: v for k, v in tensors.items() if k.startswith("outlier_")})


def storage_bits(shape: tuple[int, int], spec: LayerSpec, n_outliers: int | None = None) -> int:
    """Total stored bits of one (out, in) matrix quantized with ``spec`` (every tensor of :func:`stored_tensors`)."""
    return _bits(stored_tensors(shape, spec, n_outliers))


def bits_per_param(shape: tuple[int, int], spec: LayerSpec, n_outliers: int | None = None) -> float:
    """Stored bits divided by the number of weights."""
    return storage_bits(shape, spec, n_outliers) / (shape[0] * shape[1])
