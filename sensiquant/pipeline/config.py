"""A whole-model job (:class:`QuantConfig`): the method, the default LayerSpec with per-layer overrides, the layers
left in full precision, how outliers are chosen, and the calibration the method or the saliency needs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..calib.windows import CalibConfig
from ..errors import SensiquantError
from ..format.spec import LayerSpec
from ..methods.base import method_from_dict, method_to_dict, needed_statistics
from ..methods.outliers import OutlierConfig
from ..methods.round import RoundConfig
from ..methods.signround import SignRoundConfig
from ..serialize import Config, coerce

DEFAULT_SKIP = ("lm_head", "*embed*")  # name patterns left in full precision: the output head and the embeddings


@dataclass(frozen=True)
class QuantConfig(Config):
    """Everything one quantization run needs. Layers get ``overrides[name]`` or ``default``; layers matching a
    ``skip`` pattern (full name or last component) stay in full precision."""

    method: Any = field(default_factory=RoundConfig)  # RoundConfig | GPTQConfig (see sensiquant.methods)
    default: LayerSpec = field(default_factory=LayerSpec)
    overrides: dict[str, LayerSpec] = field(default_factory=dict)
    skip: tuple[str, ...] = DEFAULT_SKIP
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    sequential: bool = True  # methods that need input statistics calibrate block by block (GPTQ protocol)
    # Block-output tuning of the method's rounding (SignRound); None: the method's solution as it is.
    tuning: SignRoundConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.method, dict):
            coerce(self, "method", method_from_dict(self.method))
        needed_statistics(self.method)  # a registered method config, or TypeError
        for name, cls in (("default", LayerSpec), ("outliers", OutlierConfig), ("calib", CalibConfig),
                          ("tuning", SignRoundConfig)):
            if isinstance(getattr(self, name), dict):
                coerce(self, name, cls.from_dict(getattr(self, name)))
        coerce(self, "overrides", {k: LayerSpec.from_dict(v) if isinstance(v, dict) else v
                                   for k, v in self.overrides.items()})
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise SensiquantError(f"skip must be a list of name patterns, got {self.skip!r}")
        coerce(self, "skip", tuple(self.skip))

    def spec_of(self, name: str) -> LayerSpec:
        return self.overrides.get(name, self.default)

    @property
    def needs(self) -> frozenset[str]:
        """The LayerStats fields this job calibrates: the method's, and the saliency's when any layer (the default
        or an override) keeps outliers. Empty: no calibration at all."""
        specs = [self.default, *self.overrides.values()]
        outliers = self.outliers.needs if any(s.outlier_ratio > 0 for s in specs) else frozenset()
        return needed_statistics(self.method) | outliers

    @property
    def calibrated(self) -> bool:
        """Whether the job reads calibration text at all (statistics, or block tuning)."""
        return bool(self.needs) or self.tuning is not None

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "method": method_to_dict(self.method)}

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int | None) -> dict[str, Any]:
        if version is None:  # manifests before version 1: {default, skip, overrides}, the grid fit named "method"
            data.setdefault("method", {"name": "round"})
        return data
