"""The stored form of a quantized matrix: ``W ~ (q - zero) * scale`` per group of input columns, plus sparse FP16
outliers. :class:`QuantizedWeight` holds codes, scales and zeros exactly as stored, dequantizes them, and converts
to and from the flat tensors of a checkpoint; :func:`encode` turns fitted scales/zeros into that form. Every
method (``sensiquant.methods``) ends here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import groups
from .packing import pack, unpack
from .spec import LayerSpec

MIN_SCALE = 1e-6


@dataclass
class SparseOutliers:
    """Weights kept exactly, CSR by output row: FP16 values, column indices, row pointers."""

    values: torch.Tensor  # float16 (nnz,)
    col_idx: torch.Tensor  # smallest unsigned/signed int dtype that holds in_features - 1
    row_ptr: torch.Tensor  # smallest int dtype that holds nnz, (out + 1,)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def rows(self) -> torch.Tensor:
        counts = (self.row_ptr[1:].long() - self.row_ptr[:-1].long())
        return torch.repeat_interleave(torch.arange(counts.numel()), counts)

    @staticmethod
    def from_mask(w: torch.Tensor, mask: torch.Tensor) -> SparseOutliers:
        out_features, in_features = w.shape
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=out_features)
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int64)
        row_ptr[1:] = torch.cumsum(counts, 0)
        return SparseOutliers(
            values=w[rows, cols].to(torch.float16),
            col_idx=cols.to(index_dtype(in_features - 1)),
            row_ptr=row_ptr.to(index_dtype(int(mask.sum()))),
        )


def index_dtype(max_value: int) -> torch.dtype:
    """Smallest integer dtype that stores values in [0, max_value]."""
    if max_value <= 255:
        return torch.uint8
    if max_value <= 32767:
        return torch.int16
    if max_value <= 2**31 - 1:
        return torch.int32
    return torch.int64


def _encode_meta(x: torch.Tensor, spec: LayerSpec) -> dict[str, torch.Tensor]:
    """Stored form of a scale or zero tensor: FP16, or 8-bit codes with an FP16 scale/zero per meta group."""
    if not spec.quant_meta:
        return {"": x.to(torch.float16)}
    flat = x.reshape(1, -1).float()
    pieces = groups.split_groups(flat, spec.meta_group_size)
    lo = torch.cat([p.amin(-1) for p in pieces], dim=1)
    hi = torch.cat([p.amax(-1) for p in pieces], dim=1)
    # the floor keeps |zero| = |lo| / s <= 32768 (finite in FP16) when a meta group is (nearly) constant
    s = torch.maximum((hi - lo) / 255.0, torch.maximum(lo.abs(), hi.abs()) / 32768).clamp_min(MIN_SCALE)
    s = s.to(torch.float16)
    z = (-lo / s.float()).to(torch.float16)
    codes = groups.merge_groups(
        [torch.round(p / ps + pz).clamp(0, 255) for p, ps, pz in zip(pieces, *_split2(s, z, pieces))]
    )
    return {"_q": pack(codes, 8), "_qscale": s.reshape(-1), "_qzero": z.reshape(-1)}


def _split2(s, z, pieces):
    return groups.split_like(s.float(), pieces), groups.split_like(z.float(), pieces)


def _decode_meta(stored: dict[str, torch.Tensor], shape: tuple[int, int], spec: LayerSpec) -> torch.Tensor:
    if not spec.quant_meta:
        return stored[""].float().reshape(shape)
    numel = shape[0] * shape[1]
    codes = unpack(stored["_q"], 8, numel).float().reshape(1, -1)
    pieces = groups.split_groups(codes, spec.meta_group_size)
    s = stored["_qscale"].reshape(1, -1)
    z = stored["_qzero"].reshape(1, -1)
    values = [(p - pz) * ps for p, ps, pz in zip(pieces, *_split2(s, z, pieces))]
    return groups.merge_groups(values).reshape(shape)


def _store(x: torch.Tensor, spec: LayerSpec) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    stored = _encode_meta(x, spec)
    return stored, _decode_meta(stored, tuple(x.shape), spec)


@dataclass
class QuantizedWeight:
    """A quantized (out, in) matrix: unpacked codes, stored-precision scales and zeros, optional outliers."""

    codes: torch.Tensor  # uint8 (out, in)
    scale: torch.Tensor  # float32 (out, n_groups), values exactly as stored
    zero: torch.Tensor  # float32 (out, n_groups), values exactly as stored
    spec: LayerSpec
    stored_scale: dict[str, torch.Tensor]
    stored_zero: dict[str, torch.Tensor]
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        pieces = groups.split_groups(self.codes.float(), self.spec.group_size)
        w = groups.merge_groups(
            [(q - z) * s for q, s, z in zip(pieces, groups.split_like(self.scale, pieces),
                                            groups.split_like(self.zero, pieces))]
        )
        if self.outliers is not None and self.outliers.nnz:
            w[self.outliers.rows(), self.outliers.col_idx.long()] = self.outliers.values.float()
        return w.to(dtype)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors to store (names relative to the layer)."""
        out = {"qweight": pack(self.codes, self.spec.bits)}
        out.update({"scale" + k: v for k, v in self.stored_scale.items()})
        out.update({"zero" + k: v for k, v in self.stored_zero.items()})
        if self.outliers is not None and self.outliers.nnz:
            out.update(
                outlier_values=self.outliers.values,
                outlier_col_idx=self.outliers.col_idx,
                outlier_row_ptr=self.outliers.row_ptr,
            )
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], shape: tuple[int, int], spec: LayerSpec) -> QuantizedWeight:
        out_features, in_features = shape
        meta_shape = (out_features, groups.num_groups(in_features, spec.group_size))
        stored_scale = {k[len("scale"):]: v for k, v in tensors.items() if k.startswith("scale")}
        stored_zero = {k[len("zero"):]: v for k, v in tensors.items() if k.startswith("zero")}
        outliers = None
        if "outlier_values" in tensors:
            outliers = SparseOutliers(
                tensors["outlier_values"], tensors["outlier_col_idx"], tensors["outlier_row_ptr"]
            )
        codes = unpack(tensors["qweight"], spec.bits, out_features * in_features).reshape(shape)
        return QuantizedWeight(
            codes=codes,
            scale=_decode_meta(stored_scale, meta_shape, spec),
            zero=_decode_meta(stored_zero, meta_shape, spec),
            spec=spec,
            stored_scale=stored_scale,
            stored_zero=stored_zero,
            outliers=outliers,
        )


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: LayerSpec,
           outlier_mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Store scale/zero at their storage precision, then compute codes against the stored values."""
    stored_scale, scale_s = _store(scale, spec)
    stored_zero, zero_s = _store(zero, spec)
    qmax = 2**spec.bits - 1
    pieces = groups.split_groups(w.float(), spec.group_size)
    codes = groups.merge_groups(
        [torch.round(p / s + z).clamp(0, qmax) for p, s, z in
         zip(pieces, groups.split_like(scale_s.clamp_min(MIN_SCALE), pieces), groups.split_like(zero_s, pieces))]
    ).to(torch.uint8)
    outliers = None
    if outlier_mask is not None and bool(outlier_mask.any()):
        outliers = SparseOutliers.from_mask(w.float(), outlier_mask)
    return QuantizedWeight(codes, scale_s, zero_s, spec, stored_scale, stored_zero, outliers)
