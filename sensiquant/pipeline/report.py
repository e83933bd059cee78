"""What a run quantized and what it costs: per layer its shape, spec and exact stored bits, plus totals."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..format.spec import LayerSpec


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
    """The per-layer record of a run plus totals; ``extra`` holds stage timings and the calibration loss."""

    layers: dict[str, LayerReport] = field(default_factory=dict)
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

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
