"""Exact storage accounting. One function, used by the CLI, the reports and the checkpoint writer alike.

Counts every stored bit of a quantized matrix: packed codes (padded to whole bytes as packed), scales and zeros
(FP16, or 8-bit codes plus an FP16 scale and zero per meta group), and FP16 outliers in CSR form with the
smallest index dtypes that fit.
"""

from __future__ import annotations

import math

import torch

from .groups import num_groups
from .packing import packed_nbytes
from .qweight import index_dtype
from .spec import LayerSpec


def _meta_bits(numel: int, spec: LayerSpec) -> int:
    if not spec.quant_meta:
        return 16 * numel
    n_meta_groups = math.ceil(numel / spec.meta_group_size)
    return 8 * packed_nbytes(numel, 8) + 2 * 16 * n_meta_groups


def outlier_bits(shape: tuple[int, int], nnz: int) -> int:
    """FP16 values + column indices + row pointers of a CSR outlier set with ``nnz`` entries."""
    if nnz == 0:
        return 0
    out_features, in_features = shape
    col_bits = torch.iinfo(index_dtype(in_features - 1)).bits
    ptr_bits = torch.iinfo(index_dtype(nnz)).bits
    return nnz * (16 + col_bits) + (out_features + 1) * ptr_bits


def storage_bits(shape: tuple[int, int], spec: LayerSpec, n_outliers: int | None = None) -> int:
    """Total stored bits of one (out, in) matrix quantized with ``spec``.

    ``n_outliers`` defaults to ``round(outlier_ratio * numel)``, the count the outlier selection keeps.
    """
    out_features, in_features = shape
    numel = out_features * in_features
    n_meta = out_features * num_groups(in_features, spec.group_size)
    if n_outliers is None:
        n_outliers = round(spec.outlier_ratio * numel)
    return 8 * packed_nbytes(numel, spec.bits) + 2 * _meta_bits(n_meta, spec) + outlier_bits(shape, n_outliers)


def bits_per_param(shape: tuple[int, int], spec: LayerSpec, n_outliers: int | None = None) -> float:
    """Stored bits divided by the number of weights."""
    return storage_bits(shape, spec, n_outliers) / (shape[0] * shape[1])
