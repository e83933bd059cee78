"""QuantLinear: a drop-in nn.Linear whose weight lives as packed codes, scales/zeros and sparse outliers (CSR or
block)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..format.accounting import storage_bits
from ..format.qweight import QuantizedWeight
from ..format.spec import LayerSpec


class QuantLinear(nn.Module):
    """Forward = dequantize, then matmul: numerically equal to ``F.linear(x, qweight.dequantize(), bias)``."""

    def __init__(self, in_features: int, out_features: int, spec: LayerSpec, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        self.tensor_names = sorted(tensors)
        for name, value in tensors.items():
            self.register_buffer(name, value)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._holding, self._held = False, None  # see hold_dequantized

    @classmethod
    def from_quantized(cls, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        out_features, in_features = qweight.shape
        return cls(in_features, out_features, qweight.spec, qweight.to_tensors(), bias)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in self.tensor_names}

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight.from_tensors(self.stored_tensors(), (self.out_features, self.in_features), self.spec)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.quantized_weight().dequantize(dtype)

    @property
    def n_outliers(self) -> int:
        for name in ("outlier_values", "outlier_offsets"):  # CSR values, or block offsets: one per outlier
            if name in self.tensor_names:
                return int(getattr(self, name).numel())
        return 0

    def storage_bits(self) -> int:
        return storage_bits((self.out_features, self.in_features), self.spec, self.n_outliers)

    def hold_dequantized(self, hold: bool = True) -> None:
        """While held, the weight is dequantized on the first call and reused by the next ones (a block that runs
        many windows in a row); releasing frees it."""
        self._holding, self._held = hold, None

    def _apply(self, fn, recurse=True):
        """Device moves (``.to(device)``, ``.cuda()``) move the stored tensors; dtype casts (``model.to(
        torch.bfloat16)``, ``.half()``) leave them as stored: the scales, zeros and outliers are the format, and
        rounding them to another float type would change the weights. The layer computes in its input's dtype;
        the bias follows the cast."""
        kept = {name: getattr(self, name) for name in self.tensor_names}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._held = None
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self._held
        if w is None or w.dtype != x.dtype:
            w = self.dequantize(x.dtype)
            if self._holding:
                self._held = w
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid={s.grid}, "
                f"bits={s.bits}, group_size={s.group_size}, outliers={self.n_outliers}")
