"""Quantizing a model in place: walk its linear layers, quantize each weight, swap in QuantLinear."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import LayerSpec, QuantConfig
from .nn import QuantLinear
from .quant import quantize_weight
from .walk import find_linears, set_module


@dataclass
class LayerReport:
    shape: tuple[int, int]
    spec: LayerSpec
    bits: int  # stored bits, from the accounting function
    n_outliers: int = 0

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "spec": self.spec.to_dict(), "bits": self.bits,
                "n_outliers": self.n_outliers}

    @classmethod
    def from_dict(cls, data: dict) -> LayerReport:
        return cls(tuple(data["shape"]), LayerSpec.from_dict(data["spec"]), data["bits"], data.get("n_outliers", 0))


@dataclass
class QuantReport:
    """What was quantized and what it costs: the per-layer plan plus totals."""

    layers: dict[str, LayerReport] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)  # method-specific facts (GWQ settings, calibration timings)

    @property
    def quantized_params(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers.values())

    @property
    def quantized_bits(self) -> int:
        return sum(r.bits for r in self.layers.values())

    @property
    def bits_per_param(self) -> float:
        """Stored bits per weight over the quantized linear layers (codes, scales, zeros, outliers)."""
        return self.quantized_bits / max(self.quantized_params, 1)

    @property
    def n_outliers(self) -> int:
        return sum(r.n_outliers for r in self.layers.values())

    def summary(self) -> dict:
        return {"n_layers": len(self.layers), "quantized_params": self.quantized_params,
                "quantized_bytes": self.quantized_bits / 8, "bits_per_param": self.bits_per_param,
                "n_outliers": self.n_outliers, "seconds": self.seconds, **self.extra}


def plan_layers(model: nn.Module, config: QuantConfig) -> dict[str, LayerSpec]:
    """The spec of every linear layer to quantize: the default, or an override for that name."""
    return {name: config.overrides.get(name, config.default) for name in find_linears(model, config.skip)}


@torch.no_grad()
def quantize_model(model: nn.Module, config: QuantConfig, progress: bool = True) -> QuantReport:
    """Replace each selected nn.Linear of ``model`` by a QuantLinear; returns the per-layer report."""
    start = time.perf_counter()
    report = QuantReport()
    linears = find_linears(model, config.skip)
    for name, spec in tqdm(plan_layers(model, config).items(), desc="quantize", disable=not progress):
        linear = linears[name]
        qweight = quantize_weight(linear.weight.detach().float(), spec)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        qlinear = QuantLinear.from_quantized(qweight, bias)
        set_module(model, name, qlinear)
        report.layers[name] = LayerReport(qweight.shape, spec, qlinear.storage_bits(), qlinear.n_outliers)
    report.seconds = time.perf_counter() - start
    return report
