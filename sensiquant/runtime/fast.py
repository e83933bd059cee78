"""Fast CPU inference for :class:`QuantLinear` layers, without ever holding a dense weight.

:class:`FastQuantLinear` keeps only kernel-format buffers and picks one path per layer:

* ``int4pack``: 4-bit codes (2/3-bit too with ``widen=True``, which holds them as 4-bit codes: faster, more
  memory) through PyTorch's CPU kernel ``aten._weight_int4pack_mm_for_cpu``. The kernel computes
  ``(q - 8) * scale + z'`` per group; with ``z' = (8 - zero) * scale`` that is our ``(q - zero) * scale``. It needs
  ``out_features % 16 == 0`` and groups of 32/64/128/256 columns; a layer whose groups are all multiples of such a
  kernel group (576 = 4 x 128 + 64 runs at kernel group 64, scale and zero repeated) is accepted when its bytes stay
  within ``MEMORY_SLACK`` (10 %) of the stored bytes (the scale/zero pair is held in the activation dtype). Only
  for bf16 layers (``INT4PACK_DTYPES``): PyTorch's fp32 and fp16 versions of the kernel are scalar code; and only
  on AVX-512 CPUs unless widened (:func:`int4pack_preferred`).
* ``packed``: everything else when the C++ extension (``csrc/packed_kernels.cpp``) builds: the codes stay densely
  bit-packed with their stored number of bits (re-laid out per row in blocks of 32 codes; groups whose width is
  not a multiple of 32 are zero-padded), scales/zeros stay exactly as stored (FP16, or the 8-bit
  ``quant_meta`` codes decoded per row in the kernel). Decode (at most ``GEMV_MAX_ROWS`` rows of x) runs a fused
  unpack-and-multiply, ``y[n] = sum_g scale[n,g] * (sum_k q[n,k] x[k] - zero[n,g] * sum_k x[k])`` accumulated
  in fp32 (AVX-512 FMAs; for bf16 x and 2-4-bit codes AVX512-BF16 dot products of exact bf16 codes and x, whose
  products are exact), over output rows in parallel; prefill dequantizes the layer (bit-equal to the reference)
  into a temporary weight in x's dtype and calls ``F.linear``.
* ``dequant``: the pure PyTorch fallback when the extension is missing: stored tensors, dequantize, ``F.linear``.

Outliers are applied exactly as the reference has them, as fp32 corrections computed once at conversion: each
outlier's value minus the code value it replaces. The packed kernel adds ``delta * x`` per outlier (nothing decoded
per call; its dequantization writes replaced + delta, which equals the value exactly: ``packed_outlier_deltas``
picks the delta so); the int4pack path adds ``x @ delta^T`` after its kernel. Block outliers
(``outlier_format="block"``) are first converted into CSR with their exact values (``(q - zero) * scale + residual
code * residual scale``, see :meth:`QuantizedWeight.csr_outliers`). Either way a layer holds fp32 corrections in
CSR: 2 bytes per outlier more than FP16 CSR, and other bytes than the stored blocks.

The extension is built and loaded by :mod:`sensiquant.runtime.extension`; the layouts live in
:mod:`sensiquant.runtime.layout`.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..format import groups
from ..format.accounting import outlier_bits
from ..format.qweight import QuantizedWeight
from .extension import build_extension, extension_available, extension_error, extension_loaded
from .layout import group_widths, int4pack_available, kernel_group, to_kernel_layout
from .qlinear import QuantLinear
from .walk import set_module

GEMV_MAX_ROWS = 4  # the packed kernel's batch limit; more rows of x dequantize the layer for F.linear
MEMORY_SLACK = 0.10  # int4pack may hold at most this share more bytes than the stored layer
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# layer dtypes that take int4pack: its fp32 and fp16 CPU kernels are scalar code (30-60x slower than the packed one)
INT4PACK_DTYPES = (torch.bfloat16,)
PATHS = ("int4pack", "packed", "dequant")
MIN_FUSED_META = 16  # fused 8-bit-metadata layers: smallest meta group (each costs 8 bytes of repeated FP16 meta)
_EMPTY_HALF = torch.empty(0, dtype=torch.float16)


_workspaces = threading.local()


def _workspace(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer for one dequantized layer (packed-path prefill), grown to the largest layer seen.

    Reused because a fresh multi-megabyte tensor per call is mapped anew by the allocator, and faulting its pages in
    cost as much as dequantizing into them. Holds one dense layer per thread and dtype; see
    :func:`release_workspace`."""
    buffers = getattr(_workspaces, "buffers", None)
    if buffers is None:
        buffers = _workspaces.buffers = {}
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def release_workspace() -> None:
    """Free this thread's prefill workspace (it is rebuilt on the next prefill)."""
    _workspaces.buffers = {}


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def _stored_bytes(qlinear: QuantLinear) -> int:
    return sum(_nbytes(t) for t in qlinear.stored_tensors().values())


def _int4pack_bytes(qlinear: QuantLinear, kgroup: int, dtype: torch.dtype) -> int:
    n, k = qlinear.out_features, qlinear.in_features
    total = n * k // 2 + (k // kgroup) * n * 2 * torch.tensor([], dtype=dtype).element_size()
    if qlinear.n_outliers:  # CSR corrections with fp32 values (2 bytes more than FP16), whatever the stored format
        total += outlier_bits((n, k), qlinear.n_outliers) // 8 + 2 * qlinear.n_outliers
    return total


def int4pack_preferred() -> bool:
    """Whether 4-bit layers take int4pack: PyTorch's kernel is the faster one on AVX-512 CPUs; with AVX2 (and on
    other CPUs) our packed kernel is (1.7x on SmolLM2's layers, BENCHMARKS.md "Kernels for AVX2"), so int4pack is
    taken there only when the extension is missing. Follows ``ATEN_CPU_CAPABILITY``."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") or not extension_available()


def choose_path(qlinear: QuantLinear, dtype: torch.dtype = torch.bfloat16, widen: bool = False) -> str:
    """The path :meth:`FastQuantLinear.from_quant_linear` takes for ``qlinear`` (see the module docstring)."""
    bits = qlinear.spec.bits
    if int4pack_available() and dtype in INT4PACK_DTYPES and qlinear.out_features % 16 == 0 and \
            ((bits == 4 and int4pack_preferred()) or (widen and bits < 4)):
        kgroup = kernel_group(qlinear.in_features, qlinear.spec.group_size)
        if kgroup is not None and (bits < 4 or _int4pack_bytes(qlinear, kgroup, dtype)
                                   <= (1 + MEMORY_SLACK) * _stored_bytes(qlinear)):
            return "int4pack"
    return "packed" if extension_available() else "dequant"


# ---------------------------------------------------------------------------------------------------------------
# The layer


class FastQuantLinear(nn.Module):
    """A :class:`QuantLinear` run by a CPU kernel on its packed weight; outputs equal the reference up to rounding.

    Build it with :meth:`from_quant_linear`. ``path`` is ``int4pack``, ``packed`` or ``dequant``;
    ``kernel_name`` names the kernel actually run (``dequant`` says the C++ extension was unavailable).
    """

    # packed path, at most GEMV_MAX_ROWS rows of x (decode), 2-4-bit codes: round x to int8 per block of 32 and sum
    # the code products in integers (computes with that rounded x). Off by default; see LeanDecoder(act8=True)
    act8: bool = False

    def __init__(self, in_features: int, out_features: int, spec, path: str, dtype: torch.dtype,
                 bias: torch.Tensor | None = None):
        super().__init__()
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}: choose one of {', '.join(PATHS)}")
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.path, self.dtype = path, dtype
        self.group = groups.resolve_group_size(spec.group_size, in_features)
        self.kernel_group: int | None = None
        self.meta_group = spec.meta_group_size if spec.quant_meta else 0
        self.kernel_name = ""
        self._args: tuple | None = None
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_quant_linear(cls, qlinear: QuantLinear, dtype: torch.dtype = torch.bfloat16, widen: bool = False,
                          path: str | None = None) -> FastQuantLinear:
        """Convert ``qlinear``; ``path`` forces a path (raises ``ValueError`` when the layer cannot take it)."""
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {COMPUTE_DTYPES}, got {dtype}")
        path = path or choose_path(qlinear, dtype, widen)
        layer = cls(qlinear.in_features, qlinear.out_features, qlinear.spec, path, dtype, qlinear.bias)
        if path == "int4pack":
            layer._init_int4pack(qlinear)
        elif path == "packed":
            layer._init_packed(qlinear)
        else:
            layer._init_dequant(qlinear)
        return layer

    def _init_int4pack(self, qlinear: QuantLinear) -> None:
        kgroup = kernel_group(self.in_features, self.spec.group_size)
        if not int4pack_available() or kgroup is None or self.out_features % 16 or self.spec.bits > 4:
            raise ValueError(f"int4pack cannot run this layer: {qlinear.extra_repr()}")
        qw = qlinear.quantized_weight()
        self.kernel_group = kgroup
        self.kernel_name = "aten._weight_int4pack_mm_for_cpu"
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32), 1))
        reps = torch.tensor([w // kgroup for w in group_widths(self.in_features, self.spec.group_size)])
        scale = torch.repeat_interleave(qw.scale, reps, dim=1)  # (N, K / kgroup)
        zero = torch.repeat_interleave(qw.zero, reps, dim=1)
        meta = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1)  # (K / kgroup, N, 2)
        self.register_buffer("scales_zeros", meta.to(self.dtype).contiguous())
        csr = qw.csr_outliers()
        if csr is not None:
            rows, cols = csr.rows(), csr.col_idx.long()
            g = torch.clamp(cols // self.group, max=qw.scale.shape[1] - 1)
            replaced = (qw.codes[rows, cols].float() - qw.zero[rows, g]) * qw.scale[rows, g]
            self.register_buffer("delta_values", csr.values.float() - replaced)
            self.register_buffer("delta_col", csr.col_idx.contiguous())
            self.register_buffer("delta_ptr", csr.row_ptr.contiguous())
        else:
            self.delta_values = self.delta_col = self.delta_ptr = None
        if self.delta_values is not None or self.bias is not None:
            extension_available()  # corrections and bias in one C++ pass when it builds (PyTorch ops otherwise)

    def _init_packed(self, qlinear: QuantLinear) -> None:
        if not extension_available():
            raise ValueError(f"the packed path needs the C++ extension: {extension_error()}")
        info = build_extension()
        self.kernel_name = f"sensiquant.packed_gemv[{info['isa']}]"
        qw = qlinear.quantized_weight()
        self.register_buffer("codes", to_kernel_layout(qw.codes, self.spec.bits, self.spec.group_size))
        stored = qlinear.stored_tensors()  # scales and zeros: the stored tensors themselves, not copies
        for prefix in ("scale", "zero"):
            for suffix in (("_q", "_qscale", "_qzero") if self.meta_group else ("",)):
                self.register_buffer(prefix + suffix, stored[prefix + suffix].contiguous())
        csr = qw.csr_outliers()  # the stored CSR tensors themselves, or block outliers converted (fp32 values)
        values = (None, None, None)
        if csr is not None:  # fp32 corrections, once: the GEMV then decodes nothing per outlier
            delta = torch.ops.sensiquant.packed_outlier_deltas(
                self.codes, self.spec.bits, self.group, self.in_features, *self._meta_args(), csr.values.contiguous(),
                csr.col_idx.contiguous(), csr.row_ptr.contiguous())
            values = (delta, csr.col_idx, csr.row_ptr)
        for name, value in zip(("outlier_delta", "outlier_col_idx", "outlier_row_ptr"), values, strict=True):
            if value is not None:
                self.register_buffer(name, value.contiguous())
            else:
                setattr(self, name, None)

    def _init_dequant(self, qlinear: QuantLinear) -> None:
        self.kernel_name = "torch: dequantize + F.linear (no C++ extension)"
        self.tensor_names = sorted(qlinear.tensor_names)
        for name, value in qlinear.stored_tensors().items():
            self.register_buffer(name, value)

    # -- compute --------------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.float()``...: kernel-format buffers keep their dtypes (their kernels need
        them; CPU only), only the bias follows."""
        if self.bias is not None:
            self.bias.data = fn(self.bias.data)
        self._args = None
        return self

    def _kernel_args(self) -> tuple:
        """The packed kernels' weight arguments (gemv, dequantize), built once: buffers are never replaced (see
        ``_apply``) and building them per call costs more than a small layer's product."""
        if getattr(self, "_args", None) is None:
            meta, outliers = self._meta_args(), self._outlier_args()
            self._args = ((self.codes, self.spec.bits, self.group, *meta, *outliers),
                          (self.codes, self.spec.bits, self.group, self.in_features, *meta, *outliers))
        return self._args

    def _meta_args(self) -> list:
        if self.meta_group:
            return [self.scale_q, self.scale_qscale, self.scale_qzero, self.zero_q, self.zero_qscale,
                    self.zero_qzero, self.meta_group]
        empty = _EMPTY_HALF
        return [self.scale, empty, empty, self.zero, empty, empty, 0]

    def _outlier_args(self) -> list:
        return [self.outlier_delta, self.outlier_col_idx, self.outlier_row_ptr]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in COMPUTE_DTYPES:
            x2 = x2.to(self.dtype)
        x2 = x2.contiguous()
        if self.path == "int4pack":
            y = self._forward_int4pack(x2)
        elif self.path == "packed":
            y = self._forward_packed(x2)
        else:
            y = F.linear(x2, self.dequantize(x2.dtype), self._bias(x2.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def decode_fn(self, act8: bool | None = None):
        """A callable ``x2 -> y`` for contiguous 2-D ``x2`` in a compute dtype: up to ``GEMV_MAX_ROWS`` rows (batch-1
        decode) call the kernel directly, without the module call and the checks of ``forward`` (about 6 us per
        call, more than a small layer's product); more rows go through ``forward``. ``act8`` overrides
        :attr:`act8` for this callable (the layer is not changed)."""
        if self.path != "packed":
            return self.forward
        op, args, bias = torch.ops.sensiquant.packed_gemv.default, self._kernel_args()[0], self.bias
        act8 = self.act8 if act8 is None else act8
        forward = self.forward
        return lambda x2: op(x2, *args, bias, act8) if x2.shape[0] <= GEMV_MAX_ROWS else forward(x2)

    def _bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(dtype)

    def _forward_packed(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] == 0:
            return x2.new_zeros(0, self.out_features)
        if x2.shape[0] <= GEMV_MAX_ROWS:
            return torch.ops.sensiquant.packed_gemv(x2, *self._kernel_args()[0], self.bias, self.act8)
        # prefill: the layer dequantized into this thread's workspace (one layer at a time), then a dense matmul
        weight = _workspace(self.out_features * self.in_features, x2.dtype).view(self.out_features, self.in_features)
        torch.ops.sensiquant.packed_dequant_into(weight, *self._kernel_args()[1])
        return F.linear(x2, weight, self._bias(x2.dtype))

    def _forward_int4pack(self, x2: torch.Tensor) -> torch.Tensor:
        meta = self.scales_zeros if self.scales_zeros.dtype == x2.dtype else self.scales_zeros.to(x2.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.kernel_group, meta)
        if self.delta_values is None and self.bias is None:
            return y
        bias = self._bias(x2.dtype)
        if extension_loaded():
            return torch.ops.sensiquant.csr_add_(y, x2, self.delta_values, self.delta_col, self.delta_ptr, bias)
        if self.delta_values is not None:  # pure PyTorch: y[:, row] += delta * x[:, col]
            counts = self.delta_ptr[1:].long() - self.delta_ptr[:-1].long()
            rows = torch.repeat_interleave(torch.arange(self.out_features), counts)
            contrib = x2.float()[:, self.delta_col.long()] * self.delta_values
            y = y.float().index_add_(1, rows, contrib).to(x2.dtype)
        return y if bias is None else y + bias

    # -- inspection -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense (out, in) weight this layer computes with (bit-equal to the reference except int4pack, which
        is only known through its kernel: fp32 rounding of ``(q - 8) * scale + z'``)."""
        if self.path == "packed":
            if dtype not in COMPUTE_DTYPES:
                return self.dequantize(torch.float32).to(dtype)
            return torch.ops.sensiquant.packed_dequant(self.codes, self.spec.bits, self.group, self.in_features,
                                                       *self._meta_args(), *self._outlier_args(), dtype)
        if self.path == "dequant":
            stored = {name: getattr(self, name) for name in self.tensor_names}
            return QuantizedWeight.from_tensors(stored, (self.out_features, self.in_features),
                                                self.spec).dequantize(dtype)
        eye = torch.eye(self.in_features, dtype=torch.float32)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.kernel_group,
                                                       self.scales_zeros.float()).t().contiguous()
        if self.delta_values is not None:
            counts = self.delta_ptr[1:].long() - self.delta_ptr[:-1].long()
            rows = torch.repeat_interleave(torch.arange(self.out_features), counts)
            w.index_put_((rows, self.delta_col.long()), self.delta_values, accumulate=True)
        return w.to(dtype)

    def weight_bytes(self) -> int:
        """Bytes of every buffer this layer holds (the weight in kernel format; the bias is not counted)."""
        return sum(_nbytes(b) for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, path={self.path}, kernel={self.kernel_name}")


# ---------------------------------------------------------------------------------------------------------------
# Whole models


def convert_to_fast(model: nn.Module, dtype: torch.dtype = torch.bfloat16, widen: bool = False) -> dict[str, str]:
    """Replace every :class:`QuantLinear` of ``model`` by a :class:`FastQuantLinear` and cast everything else to
    ``dtype`` (as ``model.to(dtype)`` would). Returns ``{layer name: path}``."""
    paths = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            fast = FastQuantLinear.from_quant_linear(module, dtype=dtype, widen=widen)
            set_module(model, name, fast)
            paths[name] = fast.path
    for module in model.modules():
        if isinstance(module, FastQuantLinear):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(module, pname, nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad))
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                setattr(module, bname, buf.to(dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return paths


def _cat_csr(parts: list[tuple | None], rows: list[int], dtype: torch.dtype):
    """One CSR matrix of row-stacked CSR parts (None parts have no entries); None when no part has any."""
    if all(p is None for p in parts):
        return None, None, None
    values, cols, ptrs, offset = [], [], [torch.zeros(1, dtype=torch.int32)], 0
    for part, n in zip(parts, rows, strict=True):
        if part is None:
            ptrs.append(torch.full((n,), offset, dtype=torch.int32))
            continue
        v, c, ptr = part
        values.append(v.to(dtype))
        cols.append(c.to(torch.int32))
        ptrs.append(ptr[1:].to(torch.int32) + offset)
        offset += int(ptr[-1])
    return torch.cat(values), torch.cat(cols), torch.cat(ptrs)


def _split_meta(values: torch.Tensor, count: int, meta: int, sub: int) -> torch.Tensor:
    """The FP16 meta scales (or zeros) of ``count`` entries in groups of ``meta``, one per group of ``sub`` (a
    divisor of ``meta``): each repeated for the sub-groups it covers, so entry i decodes with the same value."""
    starts = torch.arange(0, count, sub)
    return values.reshape(-1)[starts // meta].contiguous()


def _cat_bias(layers, dtype: torch.dtype) -> torch.Tensor | None:
    if all(layer.bias is None for layer in layers):
        return None
    return torch.cat([layer.bias.detach().to(dtype) if layer.bias is not None else
                      torch.zeros(layer.out_features, dtype=dtype) for layer in layers])


def fuse_rows(layers: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([layer(x) for layer in layers], -1)`` (the layers share their input), or None.

    Fuses ``nn.Linear`` layers of one dtype, and :class:`FastQuantLinear` layers of one spec, dtype and path whose
    kernel buffers stack by rows: int4pack packs rows in blocks of 64, and 8-bit metadata is grouped over the
    flattened scales: the fused layer decodes them in meta groups of the largest size that divides the scale count
    of every layer but the last (their FP16 meta scales and zeros repeated to match, bit-exact), at least
    ``MIN_FUSED_META`` entries. No second copy is kept: the layers' weights and codes become views of the fused
    layer's (they compute as before)."""
    first = layers[0]
    if len(layers) < 2 or any(layer.in_features != first.in_features for layer in layers):
        return None
    rows = [layer.out_features for layer in layers]
    if all(type(layer) is nn.Linear for layer in layers):
        return _fuse_linears(layers, rows)
    if not all(isinstance(layer, FastQuantLinear) for layer in layers) or \
            len({(layer.spec, layer.path, layer.dtype) for layer in layers}) != 1 or first.path == "dequant":
        return None
    meta = sub = 0  # packed layers with 8-bit metadata: the parts' meta group and the fused layer's
    if first.path == "int4pack":
        if any(n % 64 for n in rows[:-1]):
            return None
        big = {"packed": None, "delta_values": None, "delta_col": None}
    else:
        meta = first.meta_group
        sub = math.gcd(meta, *(layer.scale_q.numel() for layer in layers[:-1])) if meta else 0
        if meta and sub < MIN_FUSED_META:
            return None
        stored = ["scale_q", "zero_q"] if meta else ["scale", "zero"]
        big = {"codes": None, **dict.fromkeys(stored), "outlier_delta": None, "outlier_col_idx": None}
    fused = FastQuantLinear(first.in_features, sum(rows), first.spec, first.path, first.dtype,
                            _cat_bias(layers, first.dtype))
    fused.kernel_name, fused.kernel_group = first.kernel_name, first.kernel_group
    if sub:
        fused.meta_group = sub
        for name in ("scale_qscale", "scale_qzero", "zero_qscale", "zero_qzero"):
            fused.register_buffer(name, torch.cat([_split_meta(getattr(layer, name), layer.scale_q.numel(), meta, sub)
                                                   for layer in layers]))
    if first.path == "int4pack":
        fused.register_buffer("scales_zeros", torch.cat([layer.scales_zeros for layer in layers], dim=1))
        names = ("delta_values", "delta_col", "delta_ptr")
    else:
        names = ("outlier_delta", "outlier_col_idx", "outlier_row_ptr")
    parts = [None if getattr(layer, names[0]) is None else tuple(getattr(layer, n) for n in names)
             for layer in layers]
    dtype = next((p[0].dtype for p in parts if p is not None), torch.float16)
    for name, value in zip(names, _cat_csr(parts, rows, dtype), strict=True):
        if value is None:
            setattr(fused, name, None)
        else:
            fused.register_buffer(name, value)
    for name in big:
        if getattr(fused, name, None) is None and name not in names:
            fused.register_buffer(name, torch.cat([getattr(layer, name) for layer in layers]))
    for name in big:  # the layers' own large tensors become views of the fused ones
        whole, offset = getattr(fused, name), 0
        if whole is None:
            continue
        for layer in layers:
            own = getattr(layer, name)
            if own is not None:
                layer._buffers[name] = whole[offset:offset + own.shape[0]]
                offset += own.shape[0]
        assert offset == whole.shape[0]
    for layer in layers:
        layer._args = None
    return fused


def _fuse_linears(layers: list[nn.Linear], rows: list[int]) -> nn.Linear | None:
    dtype = layers[0].weight.dtype
    if any(layer.weight.dtype != dtype for layer in layers):
        return None
    fused = nn.Linear(layers[0].in_features, sum(rows), bias=False, device="meta")
    fused.weight = nn.Parameter(torch.cat([layer.weight.detach() for layer in layers]), requires_grad=False)
    bias = _cat_bias(layers, dtype)
    fused.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    offset = 0
    for layer, n in zip(layers, rows, strict=True):  # views: no second copy of the weights
        layer.weight = nn.Parameter(fused.weight.data[offset:offset + n], requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(fused.bias.data[offset:offset + n], requires_grad=False)
        offset += n
    return fused


def quant_weight_bytes(model: nn.Module) -> int:
    """Bytes of all :class:`FastQuantLinear` buffers of ``model`` (the quantized weights as held for inference)."""
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, FastQuantLinear))
