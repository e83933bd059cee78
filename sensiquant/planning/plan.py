"""A plan is data: the storage config of every weight matrix, the scores behind it, and why each layer got what
it got. It round-trips through JSON, and :meth:`Plan.specs` gives the per-layer specs the pipeline runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SensiquantError
from ..format.spec import OUTLIER_FORMATS, LayerSpec
from ..serialize import write_text_atomic
from .ladder import LadderConfig

PLAN_FORMAT = "sensiquant-plan/2"
_OLD_FORMATS = ("sensiquant-plan/1",)  # "backend" hqq/rtn/gptq, now apply_method round/gptq
APPLY_METHODS = ("round", "gptq")


@dataclass
class PlanLayer:
    """One weight matrix: where it sits, the config it gets, its exact cost and the reason."""

    name: str
    shape: tuple[int, int]
    config: str  # ladder rung, e.g. "b3g64"
    outlier_ratio: float = 0.0  # share kept as GWQ outliers (in the plan's outlier format), counted in ``bits``
    bits: int = 0  # exact stored bits, from the accounting function
    block: int | None = None  # transformer block index (None outside the repeated blocks)
    module: str = ""  # name inside the block, e.g. "self_attn.q_proj"
    part: str = ""  # SensiBoost block part: "attn.qkv", "attn.o", "mlp.gate_up", "mlp.down" or the module name
    allocated: str = ""  # the rung MXQ chose before any boost
    reason: str = ""
    scores: dict[str, float] = field(default_factory=dict)  # sensitivity, kurtosis, z-score, error ...

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        LadderConfig.from_name(self.config)  # validates the name
        if not 0.0 <= self.outlier_ratio < 0.5:
            raise SensiquantError(f"{self.name}: outlier ratio must be in [0, 0.5), got {self.outlier_ratio}")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def spec(self, grid: str = "hqq", outlier_format: str = "csr") -> LayerSpec:
        return LadderConfig.from_name(self.config).spec(grid, self.outlier_ratio, outlier_format)


@dataclass
class Plan:
    """Per-layer configs for a memory budget, with the evidence: see the module docstring."""

    method: str  # uniform | mxq | sensiboost | kurtboost
    budget_bits_per_param: float
    layers: list[PlanLayer]
    exact: bool = False  # budget-exact mode: boosts are paid for by the least sensitive layers
    model: str = ""
    grid: str = "hqq"  # grid fit of the codes (hqq or rtn)
    apply_method: str = "round"  # how the plan is applied by default: round on the grid, or GPTQ on it
    outlier_saliency: str = "grad"  # how GWQ outliers are picked, when any layer has outliers
    outlier_format: str = "csr"  # how they are stored: FP16 CSR or int8 block residuals (format/spec.py)
    flagged: list[dict[str, Any]] = field(default_factory=list)  # detected outlier layers: block, part, z-score
    profiles: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # score per type across blocks
    settings: dict[str, Any] = field(default_factory=dict)  # the PlanConfig that made it
    seconds: dict[str, float] = field(default_factory=dict)  # time per planning stage

    def __post_init__(self) -> None:
        self.layers = [PlanLayer(**layer) if isinstance(layer, dict) else layer for layer in self.layers]
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            raise SensiquantError("plan lists a layer twice")
        if self.outlier_format not in OUTLIER_FORMATS:
            raise SensiquantError(f"plan outlier format must be one of {', '.join(OUTLIER_FORMATS)}, "
                                  f"got {self.outlier_format!r}")
        if self.apply_method not in APPLY_METHODS:
            raise SensiquantError(f"plan apply method must be one of {', '.join(APPLY_METHODS)}, "
                                  f"got {self.apply_method!r}")

    @property
    def total_params(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def total_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def bits_per_param(self) -> float:
        return self.total_bits / max(self.total_params, 1)

    @property
    def has_outliers(self) -> bool:
        return any(layer.outlier_ratio > 0 for layer in self.layers)

    def layer(self, name: str) -> PlanLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise SensiquantError(f"layer {name!r} is not in the plan")

    def specs(self) -> dict[str, LayerSpec]:
        """The LayerSpec of every planned layer: its rung on the plan's grid and its outlier share and format."""
        return {layer.name: layer.spec(self.grid, self.outlier_format) for layer in self.layers}

    def config_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            key = layer.config + (f"+{layer.outlier_ratio * 100:g}%" if layer.outlier_ratio else "")
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))

    def summary(self) -> dict[str, Any]:
        return {"method": self.method, "exact": self.exact, "budget_bits_per_param": self.budget_bits_per_param,
                "bits_per_param": self.bits_per_param, "total_bits": self.total_bits,
                "total_params": self.total_params, "configs": self.config_counts(),
                "flagged": [f"{f['block']}:{f['part']}" for f in self.flagged]}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for layer in data["layers"]:
            layer["shape"] = list(layer["shape"])
        return {"format": PLAN_FORMAT, **data, "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        data = dict(data)
        fmt = data.pop("format", None)
        if fmt in _OLD_FORMATS:
            data["apply_method"] = "gptq" if data.pop("backend", "hqq") == "gptq" else "round"
        elif fmt != PLAN_FORMAT:
            raise SensiquantError(f"not a sensiquant plan (format {fmt!r}, expected {PLAN_FORMAT!r})")
        data.pop("summary", None)
        try:
            return cls(**data)
        except TypeError as exc:
            raise SensiquantError(f"bad plan: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise SensiquantError(f"plan file not found: {path}")
        try:
            return cls.from_json(path.read_text())
        except json.JSONDecodeError as exc:
            raise SensiquantError(f"plan file {path} is not valid JSON: {exc}") from None
