"""llama.cpp's block types (GGUF) as sensiquant grids: a matrix stored with ``LayerSpec(gguf="Q4_K")`` keeps its
codes, scales and mins exactly as llama.cpp's block of that type does, so that the checkpoint's ``qweight`` *is*
the GGUF tensor data and an export copies it byte for byte.

Every type is written here as ``W ~ (q - zero) * scale`` per group of ``group`` columns:

* legacy types, blocks of 32: ``Q4_0``/``Q5_0``/``Q8_0`` are symmetric (``zero = 2**(bits-1)``, FP16 ``d`` per
  block, ``scale = d``, which may be negative); ``Q4_1``/``Q5_1`` store FP16 ``d`` and ``m`` (the value of code 0):
  ``value = d * q + m``;
* K-types, super-blocks of 256 with low-bit sub-block scales against an FP16 super scale: ``Q4_K``/``Q5_K``
  (groups of 32, 6-bit scales and mins: ``value = d * sc * q - dmin * mn``), ``Q2_K`` (groups of 16, 4-bit scales
  and mins), ``Q3_K`` (groups of 16, signed 6-bit scales, ``value = d * sc * (q - 4)``) and ``Q6_K`` (groups of
  16, int8 scales, ``value = d * sc * (q - 32)``).

The byte layouts were checked against the dequantizers of the ``gguf`` package (tests/format/test_ggml.py).
Rows whose length is not a multiple of a type's block take llama.cpp's fallback type (:func:`fit_type`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SensiquantError

QK_K = 256


@dataclass(frozen=True)
class GGMLType:
    """One llama.cpp block type: code width, columns per block and per scale group, how scales are stored."""

    name: str
    bits: int
    block: int  # columns per block (a row is a whole number of blocks)
    group: int  # columns sharing one scale (and min)
    symmetric: bool  # zero fixed at 2**(bits-1); else a min per group
    sub_bits: int = 0  # K-types: bits of each group's scale (and min); 0: FP16 per block
    nbytes: int = 0  # bytes per block
    fallback: str | None = None  # llama.cpp's type for rows that are not whole blocks

    @property
    def zero(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.block


TYPES = {t.name: t for t in (
    GGMLType("Q4_0", 4, 32, 32, True, nbytes=18),
    GGMLType("Q4_1", 4, 32, 32, False, nbytes=20),
    GGMLType("Q5_0", 5, 32, 32, True, nbytes=22),
    GGMLType("Q5_1", 5, 32, 32, False, nbytes=24),
    GGMLType("Q8_0", 8, 32, 32, True, nbytes=34),
    GGMLType("Q2_K", 2, QK_K, 16, False, sub_bits=4, nbytes=84, fallback="Q4_0"),
    GGMLType("Q3_K", 3, QK_K, 16, True, sub_bits=6, nbytes=110, fallback="Q4_0"),
    GGMLType("Q4_K", 4, QK_K, 32, False, sub_bits=6, nbytes=144, fallback="Q5_0"),
    GGMLType("Q5_K", 5, QK_K, 32, False, sub_bits=6, nbytes=176, fallback="Q5_1"),
    GGMLType("Q6_K", 6, QK_K, 16, True, sub_bits=8, nbytes=210, fallback="Q8_0"),
)}


def ggml_type(name: str) -> GGMLType:
    """The type called ``name``, or one clear error."""
    t = TYPES.get(name)
    if t is None:
        raise SensiquantError(f"unknown GGUF type {name!r}: choose one of {', '.join(TYPES)}")
    return t


def fit_type(name: str, in_features: int) -> str:
    """``name``, or llama.cpp's fallback type when a row of ``in_features`` is not a whole number of its blocks
    (llama.cpp does the same: a 576-wide row cannot hold Q4_K super-blocks of 256)."""
    t = ggml_type(name)
    while in_features % t.block:
        if t.fallback is None:
            raise SensiquantError(f"rows of {in_features} columns fit no GGUF block of {t.block} columns ({name})")
        t = ggml_type(t.fallback)
    return t.name


def row_bytes(name: str, in_features: int) -> int:
    t = ggml_type(name)
    if in_features % t.block:
        raise SensiquantError(f"{name} needs rows of a multiple of {t.block} columns, got {in_features}")
    return in_features // t.block * t.nbytes


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-65504.0, 65504.0).to(torch.float16)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The entry of largest magnitude along the last axis, with its sign."""
    return torch.gather(x, -1, x.abs().argmax(-1, keepdim=True))


def store_meta(scale: torch.Tensor, zero: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], torch.Tensor,
                                                                           torch.Tensor]:
    """Fitted (out, n_groups) scales and zeros in ``name``'s storage: (stored tensors, scale, zero as read back).

    Symmetric types ignore ``zero`` (it is ``2**(bits-1)``). K-types quantize each super-block's scales (and
    mins, the values of code 0) against an FP16 super scale as llama.cpp does: the largest maps to the top code."""
    t = ggml_type(name)
    scale, zero = scale.float(), zero.float()
    out, n_groups = scale.shape
    if not t.sub_bits:
        stored = {"d": _f16(scale)} if t.symmetric else {"d": _f16(scale), "m": _f16(-zero * scale)}
        return stored, *decode_meta(stored, name)
    per = t.block // t.group
    s = scale.reshape(out, n_groups // per, per)
    if t.symmetric:
        top = 2 ** (t.sub_bits - 1)  # signed sub-scales in [-top, top - 1]; the largest magnitude maps to -top
        d = _f16(_signed_absmax(s) / -top)
        sc = torch.round(s / _nonzero(d.float())).clamp(-top, top - 1)
        sc = torch.where(d.float() == 0, 0.0, sc)
        stored = {"d": d.squeeze(-1), "sc": sc.reshape(out, n_groups).to(torch.int8)}
        return stored, *decode_meta(stored, name)
    top = 2 ** t.sub_bits - 1
    mins = (zero * scale).clamp_min(0).reshape(out, n_groups // per, per)  # -(value of code 0), >= 0 as stored
    d = _f16(s.clamp_min(0).amax(-1, keepdim=True) / top)
    dmin = _f16(mins.amax(-1, keepdim=True) / top)
    sc = torch.round(s / _nonzero(d.float())).clamp(1, top)  # >= 1: a zero scale could not carry its min
    mn = torch.round(mins / _nonzero(dmin.float())).clamp(0, top)
    stored = {"d": d.squeeze(-1), "dmin": dmin.squeeze(-1), "sc": sc.reshape(out, n_groups).to(torch.uint8),
              "mn": mn.reshape(out, n_groups).to(torch.uint8)}
    return stored, *decode_meta(stored, name)


def _nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, 1.0, x)


def _zero_from_min(m: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, 0.0, -m / _nonzero(d))


def decode_meta(stored: dict[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), float32 (out, n_groups), from the stored tensors of :func:`store_meta`."""
    t = ggml_type(name)
    if not t.sub_bits:
        d = stored["d"].float()
        if t.symmetric:
            return d, torch.full_like(d, float(t.zero))
        return d, _zero_from_min(stored["m"].float(), d)
    per = t.block // t.group
    sc = stored["sc"].float()
    scale = (stored["d"].float().repeat_interleave(per, dim=1) * sc)
    if t.symmetric:
        return scale, torch.full_like(scale, float(t.zero))
    mins = stored["dmin"].float().repeat_interleave(per, dim=1) * stored["mn"].float()
    return scale, torch.where(scale == 0, 0.0, mins / _nonzero(scale))


# --- block bytes: GGUF tensor data of (out, in) codes (uint8, in [0, 2**bits)) and stored metadata ---------------

def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """FP16 (rows, n) -> uint8 (rows, n, 2), little-endian."""
    return x.contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _bytes_f16(b: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2) -> FP16 (...)."""
    return b.contiguous().view(torch.float16).squeeze(-1)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo & 15) | ((hi & 15) << 4)


def _bitplanes(fields: torch.Tensor, width: int = 1) -> torch.Tensor:
    """(..., n, L) fields of ``width`` bits -> (..., L) bytes, field k at bits [k*width, (k+1)*width)."""
    n = fields.shape[-2]
    shifts = (torch.arange(n, device=fields.device) * width).reshape(n, 1)
    return (fields.to(torch.int32) << shifts).sum(-2).to(torch.uint8)


def _planes(b: torch.Tensor, n: int, width: int) -> torch.Tensor:
    """Inverse of :func:`_bitplanes`: (..., L) bytes -> (..., n, L) fields of ``width`` bits."""
    shifts = (torch.arange(n, device=b.device) * width).reshape(n, 1)
    return ((b.unsqueeze(-2).to(torch.int32) >> shifts) & (2**width - 1)).to(torch.uint8)


def _pack_scales_k4(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: 8 six-bit scales and mins (..., 8) -> 12 bytes (..., 12)."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    first = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    second = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    third = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([first, second, third], -1).to(torch.uint8)


def _unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = b.to(torch.int32)
    first, second, third = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([first & 63, (third & 15) | ((first >> 6) << 4)], -1)
    mn = torch.cat([second & 63, (third >> 4) | ((second >> 6) << 4)], -1)
    return sc.to(torch.uint8), mn.to(torch.uint8)


def _pack_scales_q3(sc: torch.Tensor) -> torch.Tensor:
    """Q3_K: 16 signed six-bit scales (..., 16) -> 12 bytes: low nibbles in bytes 0-7, high 2 bits in 8-11."""
    u = (sc.to(torch.int32) + 32)
    low = _nibbles(u[..., :8], u[..., 8:])
    high = _bitplanes((u >> 4).reshape(*u.shape[:-1], 4, 4), 2)
    return torch.cat([low.to(torch.uint8), high], -1)


def _unpack_scales_q3(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    low = torch.cat([b[..., :8] & 15, b[..., :8] >> 4], -1)
    high = _planes(b[..., 8:12].to(torch.uint8), 4, 2).to(torch.int32).reshape(*b.shape[:-1], 16)
    return ((low | (high << 4)) - 32).to(torch.int8)


def pack_blocks(name: str, codes: torch.Tensor, stored: dict[str, torch.Tensor]) -> torch.Tensor:
    """GGUF tensor data (uint8, (out, row_bytes)) of ``codes`` (out, in) with ``stored`` metadata."""
    t = ggml_type(name)
    out, n = codes.shape
    nb = n // t.block
    row_bytes(name, n)
    q = codes.to(torch.int32).reshape(out, nb, t.block)
    if t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        head = [_f16_bytes(stored["d"])]
        if not t.symmetric:
            head.append(_f16_bytes(stored["m"]))
        if t.bits == 8:
            body = [(q - 128).to(torch.int8).view(torch.uint8)]
        else:
            body = [_nibbles(q[..., :16], q[..., 16:]).to(torch.uint8)]
            if t.bits == 5:
                high = (q >> 4) & 1
                qh = _bitplanes(high.reshape(out, nb, 4, 8).transpose(-1, -2))  # bytes of a little-endian u32
                body.insert(0, qh)
        return torch.cat(head + body, -1).reshape(out, -1)
    d = _f16_bytes(stored["d"])
    if t.name in ("Q4_K", "Q5_K"):
        dmin = _f16_bytes(stored["dmin"])
        scales = _pack_scales_k4(stored["sc"].reshape(out, nb, 8), stored["mn"].reshape(out, nb, 8))
        c = q.reshape(out, nb, 4, 2, 32)  # chunk of 64: two groups of 32, low and high nibble
        qs = _nibbles(c[..., 0, :], c[..., 1, :]).to(torch.uint8).reshape(out, nb, 128)
        parts = [d, dmin, scales]
        if t.bits == 5:
            parts.append(_bitplanes(((q >> 4) & 1).reshape(out, nb, 8, 32)))
        return torch.cat(parts + [qs], -1).reshape(out, -1)
    if t.name == "Q6_K":
        h = q.reshape(out, nb, 2, 128)  # halves of 128
        low = h & 15
        ql = _nibbles(low[..., :64], low[..., 64:]).to(torch.uint8).reshape(out, nb, 128)
        qh = _bitplanes((h >> 4).reshape(out, nb, 2, 4, 32), 2).reshape(out, nb, 64)
        sc = stored["sc"].reshape(out, nb, 16).contiguous().view(torch.uint8)
        return torch.cat([ql, qh, sc, d], -1).reshape(out, -1)
    if t.name == "Q3_K":
        low = (q & 3).reshape(out, nb, 2, 4, 32)
        qs = _bitplanes(low, 2).reshape(out, nb, 64)
        hmask = _bitplanes(((q >> 2) & 1).reshape(out, nb, 8, 32))
        scales = _pack_scales_q3(stored["sc"].reshape(out, nb, 16))
        return torch.cat([hmask, qs, scales, d], -1).reshape(out, -1)
    if t.name == "Q2_K":
        dmin = _f16_bytes(stored["dmin"])
        scales = _nibbles(stored["sc"].to(torch.int32), stored["mn"].to(torch.int32)).to(torch.uint8)
        qs = _bitplanes(q.reshape(out, nb, 2, 4, 32), 2).reshape(out, nb, 64)
        return torch.cat([scales.reshape(out, nb, 16), qs, d, dmin], -1).reshape(out, -1)
    raise SensiquantError(f"no block layout for {name}")  # unreachable: TYPES lists only the types above


def unpack_blocks(name: str, data: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Inverse of :func:`pack_blocks`: (codes uint8 (out, in), stored metadata) from GGUF tensor data."""
    t = ggml_type(name)
    out, n = shape
    nb = n // t.block
    b = data.reshape(out, nb, t.nbytes)
    if t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        stored = {"d": _bytes_f16(b[..., 0:2])}
        at = 2
        if not t.symmetric:
            stored["m"] = _bytes_f16(b[..., 2:4])
            at = 4
        if t.bits == 8:
            q = b[..., at:].contiguous().view(torch.int8).to(torch.int32) + 128
        else:
            high = 0
            if t.bits == 5:
                high = _planes(b[..., at:at + 4], 8, 1).transpose(-1, -2).reshape(out, nb, 32).to(torch.int32) << 4
                at += 4
            qs = b[..., at:].to(torch.int32)
            q = torch.cat([qs & 15, qs >> 4], -1) | high
        return q.reshape(out, n).to(torch.uint8), {k: v.reshape(out, nb) for k, v in stored.items()}
    if t.name in ("Q4_K", "Q5_K"):
        d, dmin = _bytes_f16(b[..., 0:2]), _bytes_f16(b[..., 2:4])
        sc, mn = _unpack_scales_k4(b[..., 4:16])
        at = 16
        high = 0
        if t.bits == 5:
            high = _planes(b[..., 16:48], 8, 1).to(torch.int32) << 4  # (out, nb, 8, 32)
            at = 48
        qs = b[..., at:].to(torch.int32).reshape(out, nb, 4, 32)
        q = torch.stack([qs & 15, qs >> 4], -2).reshape(out, nb, 8, 32) | high
        return q.reshape(out, n).to(torch.uint8), {"d": d, "dmin": dmin, "sc": sc.reshape(out, -1),
                                                    "mn": mn.reshape(out, -1)}
    if t.name == "Q6_K":
        ql = b[..., :128].to(torch.int32).reshape(out, nb, 2, 64)
        low = torch.cat([ql & 15, ql >> 4], -1)  # (out, nb, 2, 128)
        high = _planes(b[..., 128:192].reshape(out, nb, 2, 32), 4, 2).to(torch.int32).reshape(out, nb, 2, 128)
        q = low | (high << 4)
        sc = b[..., 192:208].contiguous().view(torch.int8).reshape(out, -1)
        return q.reshape(out, n).to(torch.uint8), {"d": _bytes_f16(b[..., 208:210]), "sc": sc}
    if t.name == "Q3_K":
        hmask = _planes(b[..., :32], 8, 1).to(torch.int32)  # (out, nb, 8, 32)
        low = _planes(b[..., 32:96].reshape(out, nb, 2, 32), 4, 2).to(torch.int32).reshape(out, nb, 8, 32)
        q = low | (hmask << 2)
        sc = _unpack_scales_q3(b[..., 96:108]).reshape(out, -1)
        return q.reshape(out, n).to(torch.uint8), {"d": _bytes_f16(b[..., 108:110]), "sc": sc}
    if t.name == "Q2_K":
        scales = b[..., :16].to(torch.int32)
        q = _planes(b[..., 16:80].reshape(out, nb, 2, 32), 4, 2).reshape(out, n)
        stored = {"d": _bytes_f16(b[..., 80:82]), "dmin": _bytes_f16(b[..., 82:84]),
                  "sc": (scales & 15).to(torch.uint8).reshape(out, -1),
                  "mn": (scales >> 4).to(torch.uint8).reshape(out, -1)}
        return q.to(torch.uint8), stored
    raise SensiquantError(f"no block layout for {name}")
