"""Fast CPU inference for quantized layers: PyTorch's packed int4 matmul, exact sparse outlier corrections.

``FastQuantLinear`` runs a :class:`QuantLinear` without ever building its dense weight:

* **int4pack**: codes of 2-4 bits go to ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (PyTorch's CPU kernel for
  4-bit weights with per-group scale and zero). Our ``(q - zero) * scale`` is the kernel's ``(q - 8) * scale +
  (8 - zero) * scale``, the same number. The kernel takes groups of 32/64/128/256 columns; a group size it lacks,
  or a shorter tail group (576 = 4 x 128 + 64), runs at the largest kernel group that divides every group, with the
  scale and zero repeated (same values, more metadata). 2- and 3-bit codes are held as 4-bit codes here ("widened":
  faster, but 4 bits in memory); ``widen=False`` keeps them packed and dequantizes one layer at a time instead.
* **dequant**: everything else (8-bit codes, group sizes that no kernel group divides, output sizes that are not a
  multiple of 16): the QuantLinear reference,
  dequantize then matmul, one layer at a time.
* FP16 **outliers** are exact: the difference between each outlier and the code it replaced is added with a sparse
  matmul (CSR), so the result equals the dequantized weight with outliers in place.
"""

from __future__ import annotations

import torch
from torch import nn

from ..quant import groups
from .qlinear import QuantLinear

KERNEL_GROUPS = (256, 128, 64, 32)


def kernel_group(in_features: int, group_size: int | None) -> int | None:
    """The largest kernel group size that divides every group of the layer (None if there is none)."""
    if group_size is None:
        group_size = in_features
    sizes = {min(group_size, in_features - start) for start in range(0, in_features, group_size)}
    for g in KERNEL_GROUPS:
        if all(s % g == 0 for s in sizes):
            return g
    return None


def int4pack_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and \
        hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


class FastQuantLinear(nn.Module):
    """A QuantLinear run by a packed CPU kernel (see the module docstring); same outputs as its reference."""

    def __init__(self, qlinear: QuantLinear, dtype: torch.dtype = torch.bfloat16, widen: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.spec = qlinear.in_features, qlinear.out_features, qlinear.spec
        self.dtype = dtype
        self.bias = None if qlinear.bias is None else nn.Parameter(qlinear.bias.detach().to(dtype),
                                                                   requires_grad=False)
        bits, group = self.spec.bits, self.spec.group_size
        kgroup = kernel_group(self.in_features, group)
        use_int4 = int4pack_supported() and kgroup is not None and self.out_features % 16 == 0 and \
            (bits == 4 or (widen and bits < 4))  # the kernel packs output rows in blocks of 16
        self.path = "int4pack" if use_int4 else "dequant"
        self.correction: torch.Tensor | None = None
        if self.path == "dequant":
            self.reference = qlinear  # dequantizes to the activation dtype; stored tensors stay as they are
            return
        qweight = qlinear.quantized_weight()
        self.kernel_group = kgroup
        codes = qweight.codes.to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        reps = [p.shape[-1] // kgroup for p in groups.split_groups(qweight.codes[:1], group)
                for _ in range(p.shape[-2])]  # pieces are (1, groups of that width, width)
        scale = torch.repeat_interleave(qweight.scale, torch.tensor(reps), dim=1)  # (out, in / kgroup)
        zero = torch.repeat_interleave(qweight.zero, torch.tensor(reps), dim=1)
        meta = torch.stack([scale.t(), ((8 - zero) * scale).t()], -1).to(dtype).contiguous()
        self.register_buffer("scales_zeros", meta)
        self._cast_meta = {}
        if qweight.outliers is not None and qweight.outliers.nnz:
            rows, cols = qweight.outliers.rows(), qweight.outliers.col_idx.long()
            replaced = (qweight.codes[rows, cols].float() - qweight.zero[rows, cols // _group(group, self)]) * \
                qweight.scale[rows, cols // _group(group, self)]
            delta = qweight.outliers.values.float() - replaced
            self.correction = torch.sparse_csr_tensor(qweight.outliers.row_ptr.to(torch.int32),
                                                      cols.to(torch.int32), delta,
                                                      (self.out_features, self.in_features), check_invariants=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.path == "dequant":
            return self.reference(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            x2 = x2.float()
        meta = self._meta(x2.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.kernel_group, meta)
        if self.correction is not None:
            y = y + torch.sparse.mm(self.correction, x2.float().t()).t().to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _meta(self, dtype: torch.dtype) -> torch.Tensor:
        """Scales and zeros in the activation dtype (the kernel wants them alike); cast once per dtype."""
        if self.scales_zeros.dtype == dtype:
            return self.scales_zeros
        if dtype not in self._cast_meta:
            self._cast_meta[dtype] = self.scales_zeros.to(dtype)
        return self._cast_meta[dtype]

    def weight_bytes(self) -> int:
        """Bytes this layer keeps for its weight (codes, metadata, outlier corrections)."""
        if self.path == "dequant":
            return sum(t.numel() * t.element_size() for t in self.reference.stored_tensors().values())
        total = self.packed.numel() * self.packed.element_size()
        total += self.scales_zeros.numel() * self.scales_zeros.element_size()
        if self.correction is not None:
            c = self.correction
            total += sum(t.numel() * t.element_size() for t in (c.values(), c.col_indices(), c.crow_indices()))
        return total

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
                f"group_size={self.spec.group_size}, path={self.path}")


def _group(group_size: int | None, layer: FastQuantLinear) -> int:
    return layer.in_features if group_size is None else group_size


def convert_to_fast(model: nn.Module, dtype: torch.dtype = torch.bfloat16, widen: bool = True) -> dict[str, str]:
    """Swap every QuantLinear of ``model`` for a FastQuantLinear and cast the rest to ``dtype``.

    Returns {layer name: path}. The model keeps working with transformers' ``generate()``.
    """
    from ..walk import set_module

    paths = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            fast = FastQuantLinear(module, dtype=dtype, widen=widen)
            set_module(model, name, fast)
            paths[name] = fast.path
    for module in model.modules():  # everything that is not a quantized layer takes the compute dtype
        if isinstance(module, FastQuantLinear):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_floating_point() and param.dtype != dtype:
                setattr(module, pname, nn.Parameter(param.detach().to(dtype), requires_grad=False))
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype and \
                    not isinstance(module, QuantLinear):
                setattr(module, bname, buf.to(dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return paths


def quant_weight_bytes(model: nn.Module) -> int:
    """Bytes the quantized layers of a converted model hold for their weights."""
    return sum(m.weight_bytes() for m in model.modules() if isinstance(m, FastQuantLinear))
