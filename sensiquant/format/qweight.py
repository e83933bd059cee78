"""The stored form of a quantized matrix: ``W ~ (q - zero) * scale`` per group of input columns, plus sparse
outliers, either FP16 values in CSR (:class:`SparseOutliers`) or int8 residuals on the codes in blocks
(:class:`BlockOutliers`). :class:`QuantizedWeight` holds codes, scales and zeros exactly as stored, dequantizes
them, and converts to and from the flat tensors of a checkpoint; :func:`encode` turns fitted scales/zeros into that
form. Every method (``sensiquant.methods``) ends here."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import ggml, groups
from .packing import pack, unpack
from .spec import LayerSpec

MIN_SCALE = 1e-6
# block outliers: consecutive row-major positions per block. 255, so that a block's count (at most every position)
# and every offset fit one uint8: any mask can be stored (a gradient ranking can fill a whole block).
OUTLIER_BLOCK = 255
RESIDUAL_MAX = 127  # block outliers: int8 residual codes in [-127, 127]
_FP16_TINY = 2.0**-24  # the smallest positive FP16 (subnormal): the floor of the residual scale
_FP16_MAX = 65504.0


@dataclass
class SparseOutliers:
    """Weights kept exactly, CSR by output row: FP16 values, column indices, row pointers."""

    values: torch.Tensor  # float16 (nnz,) as stored; float32 when converted from block outliers (csr_outliers)
    col_idx: torch.Tensor  # smallest unsigned/signed int dtype that holds in_features - 1
    row_ptr: torch.Tensor  # smallest int dtype that holds nnz, (out + 1,)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def rows(self) -> torch.Tensor:
        counts = (self.row_ptr[1:].long() - self.row_ptr[:-1].long())
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def positions(self, in_features: int) -> torch.Tensor:
        """Row-major flat positions (int64, ascending)."""
        return self.rows() * in_features + self.col_idx.long()

    def exact_values(self, grid: torch.Tensor) -> torch.Tensor:
        """The outlier values (float32); ``grid`` (the dequantized codes at their places) is not needed here."""
        return self.values.float()

    @staticmethod
    def from_mask(w: torch.Tensor, mask: torch.Tensor) -> SparseOutliers:
        rows, cols = mask.nonzero(as_tuple=True)
        return SparseOutliers(w[rows, cols].to(torch.float16), *_csr_index(rows, cols, tuple(w.shape)))


def _csr_index(rows: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Column indices and row pointers (smallest dtypes) of entries in row-major order."""
    out_features, in_features = shape
    row_ptr = torch.zeros(out_features + 1, dtype=torch.int64, device=rows.device)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out_features), 0)
    return cols.to(index_dtype(in_features - 1)), row_ptr.to(index_dtype(int(rows.numel())))


@dataclass
class BlockOutliers:
    """Outliers as int8 residuals on the dequantized codes at their places, in blocks of ``OUTLIER_BLOCK``
    consecutive row-major positions: ``value = (q - zero) * scale + codes * self.scale``. Cheaper than CSR (one
    byte of position and one of value per outlier, one count byte per block); within ``self.scale / 2`` of the
    weight instead of exact."""

    counts: torch.Tensor  # uint8 (ceil(numel / OUTLIER_BLOCK),): outliers per block
    offsets: torch.Tensor  # uint8 (nnz,): position inside its block, ascending within each block
    codes: torch.Tensor  # int8 (nnz,): residual codes
    scale: torch.Tensor  # float16 (1,): residual scale, max |residual| / RESIDUAL_MAX rounded up

    @property
    def nnz(self) -> int:
        return int(self.offsets.numel())

    def positions(self, in_features: int | None = None) -> torch.Tensor:
        """Row-major flat positions (int64, ascending)."""
        blocks = torch.repeat_interleave(torch.arange(self.counts.numel(), device=self.counts.device),
                                         self.counts.long())
        return blocks * OUTLIER_BLOCK + self.offsets.long()

    def exact_values(self, grid: torch.Tensor) -> torch.Tensor:
        """The outlier values (float32) given ``grid``, the dequantized codes at their places (float32)."""
        return grid + self.codes.float() * self.scale.float()

    @staticmethod
    def from_mask(w: torch.Tensor, grid: torch.Tensor, mask: torch.Tensor) -> BlockOutliers:
        """Residuals of ``w`` on ``grid`` (the dense dequantized codes, float32) where ``mask`` is set."""
        flat = mask.reshape(-1).nonzero().squeeze(1)
        counts = torch.bincount(flat // OUTLIER_BLOCK, minlength=math.ceil(mask.numel() / OUTLIER_BLOCK))
        residual = w.reshape(-1)[flat].float() - grid.reshape(-1)[flat]
        scale = residual_scale(float(residual.abs().max())).to(w.device)
        codes = torch.round(residual / scale.float()).clamp(-RESIDUAL_MAX, RESIDUAL_MAX)
        return BlockOutliers(counts.to(torch.uint8), (flat % OUTLIER_BLOCK).to(torch.uint8), codes.to(torch.int8),
                             scale)


def residual_scale(max_abs: float) -> torch.Tensor:
    """FP16 (1,) scale with ``RESIDUAL_MAX * scale >= max_abs`` (rounded up, so that no residual code clips),
    floored to the smallest positive FP16 and capped at the largest."""
    s = torch.tensor([min(max(max_abs / RESIDUAL_MAX, _FP16_TINY), _FP16_MAX)], dtype=torch.float64).to(torch.float16)
    if float(s) * RESIDUAL_MAX < max_abs and float(s) < _FP16_MAX:
        s = (s.view(torch.int16) + 1).view(torch.float16)  # the next FP16 up (s is positive and finite)
    return s


def floor_scale(s: torch.Tensor) -> torch.Tensor:
    """``s`` with magnitudes below ``MIN_SCALE`` raised to it, the sign kept (symmetric GGUF scales are signed)."""
    return torch.where(s.abs() < MIN_SCALE, torch.where(s < 0, -MIN_SCALE, MIN_SCALE), s)


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


def store_meta(x: torch.Tensor, spec: LayerSpec) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A scale or zero tensor as stored (its tensors) and as read back (the values every code is computed against)."""
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
    outliers: SparseOutliers | BlockOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def grid(self) -> torch.Tensor:
        """``(q - zero) * scale`` (float32, (out, in)): the dequantized codes, outliers not applied."""
        pieces = groups.split_groups(self.codes.float(), self.spec.group_size)
        return groups.merge_groups(
            [(q - z) * s for q, s, z in zip(pieces, groups.split_like(self.scale, pieces),
                                            groups.split_like(self.zero, pieces))]
        )

    def grid_at(self, positions: torch.Tensor) -> torch.Tensor:
        """:meth:`grid` at row-major flat ``positions`` only (bit-equal, without the dense matrix)."""
        in_features = self.shape[1]
        rows, cols = positions // in_features, positions % in_features
        g = cols // groups.resolve_group_size(self.spec.group_size, in_features)  # a tail group is shorter than g
        return (self.codes[rows, cols].float() - self.zero[rows, g]) * self.scale[rows, g]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.grid()
        if self.outliers is not None and self.outliers.nnz:
            flat = w.view(-1)
            pos = self.outliers.positions(self.shape[1])
            flat[pos] = self.outliers.exact_values(flat[pos])
        return w.to(dtype)

    def csr_outliers(self) -> SparseOutliers | None:
        """The outliers in CSR with their exact values, for kernels that take CSR: the stored CSR itself, or block
        outliers converted (float32 values)."""
        o = self.outliers
        if o is None or not o.nnz:
            return None
        if isinstance(o, SparseOutliers):
            return o
        pos = o.positions()
        in_features = self.shape[1]
        return SparseOutliers(o.exact_values(self.grid_at(pos)),
                              *_csr_index(pos // in_features, pos % in_features, self.shape))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat tensors to store (names relative to the layer)."""
        if self.spec.gguf is not None:  # the GGUF tensor data itself
            return {"qweight": ggml.pack_blocks(self.spec.gguf, self.codes, self.stored_scale).reshape(-1)}
        out = {"qweight": pack(self.codes, self.spec.bits)}
        out.update({"scale" + k: v for k, v in self.stored_scale.items()})
        out.update({"zero" + k: v for k, v in self.stored_zero.items()})
        o = self.outliers
        if isinstance(o, BlockOutliers) and o.nnz:
            out.update(outlier_counts=o.counts, outlier_offsets=o.offsets, outlier_codes=o.codes,
                       outlier_scale=o.scale)
        elif o is not None and o.nnz:
            out.update(outlier_values=o.values, outlier_col_idx=o.col_idx, outlier_row_ptr=o.row_ptr)
        return out

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor], shape: tuple[int, int], spec: LayerSpec) -> QuantizedWeight:
        out_features, in_features = shape
        if spec.gguf is not None:
            codes, stored = ggml.unpack_blocks(spec.gguf, tensors["qweight"], shape)
            return QuantizedWeight(codes, *ggml.decode_meta(stored, spec.gguf), spec, stored, {})
        meta_shape = (out_features, groups.num_groups(in_features, spec.group_size))
        stored_scale = {k[len("scale"):]: v for k, v in tensors.items() if k.startswith("scale")}
        stored_zero = {k[len("zero"):]: v for k, v in tensors.items() if k.startswith("zero")}
        outliers = None
        if "outlier_values" in tensors:
            outliers = SparseOutliers(
                tensors["outlier_values"], tensors["outlier_col_idx"], tensors["outlier_row_ptr"]
            )
        elif "outlier_offsets" in tensors:
            outliers = BlockOutliers(tensors["outlier_counts"], tensors["outlier_offsets"], tensors["outlier_codes"],
                                     tensors["outlier_scale"])
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
    """Store scale/zero at their storage precision, then compute codes against the stored values; outliers (where
    ``outlier_mask`` is set) in ``spec.outlier_format``, block residuals against those codes and stored values.
    GGUF types (``spec.gguf``) store scales and mins as their llama.cpp block does (``format/ggml.py``)."""
    if spec.gguf is not None:
        stored_scale, scale_s, zero_s = ggml.store_meta(scale, zero, spec.gguf)
        stored_zero = {}
        divisor = floor_scale(scale_s)  # symmetric GGUF scales may be negative
    else:
        stored_scale, scale_s = store_meta(scale, spec)
        stored_zero, zero_s = store_meta(zero, spec)
        divisor = scale_s.clamp_min(MIN_SCALE)
    qmax = 2**spec.bits - 1
    pieces = groups.split_groups(w.float(), spec.group_size)
    codes = groups.merge_groups(
        [torch.round(p / s + z).clamp(0, qmax) for p, s, z in
         zip(pieces, groups.split_like(divisor, pieces), groups.split_like(zero_s, pieces))]
    ).to(torch.uint8)
    qw = QuantizedWeight(codes, scale_s, zero_s, spec, stored_scale, stored_zero)
    if outlier_mask is not None and bool(outlier_mask.any()):
        if spec.outlier_format == "block":
            qw.outliers = BlockOutliers.from_mask(w, qw.grid(), outlier_mask)
        else:
            qw.outliers = SparseOutliers.from_mask(w.float(), outlier_mask)
    return qw
