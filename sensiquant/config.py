"""Typed configs. Every config is a dataclass that round-trips through JSON (``to_dict`` / ``from_dict``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import SensiquantError

METHODS = ("rtn", "hqq")


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise SensiquantError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return cls(**data)


@dataclass
class HQQParams:
    """Half-quadratic solver settings (defaults: the HQQ paper / package)."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    # Also update the dequantization scale (least squares on the shrunk target); the package keeps it fixed.
    optimize_scale: bool = True
    # Keep, per group, whichever candidate (min-max start, solver result) has the lowest squared error.
    # Off reproduces the hqq package; on guarantees HQQ is never worse than its min-max (RTN) start per group.
    l2_guard: bool = True
    # With integer zeros, also offer the guard the package's fractional-zero solution (see BENCHMARKS.md).
    fractional_candidate: bool = True
    # The guard's error adds guard_bias_weight * (sum of a group's errors)^2 to the squared error: the extra output
    # error a coherent shift of the group's weights causes when the inputs have a non-zero mean. With 1.0 HQQ beats
    # RTN at 4/3 bits, g64/g128 on SmolLM2-135M; with 0 (pure L2) it loses at 3-bit g128 (128.8 vs 106.6 PPL).
    guard_bias_weight: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HQQParams:
        return _from_dict(cls, data)


@dataclass
class LayerSpec:
    """How one weight matrix is stored: method, bits, group size, metadata precision, outlier share."""

    method: str = "hqq"
    bits: int = 4
    group_size: int | None = 64  # None: one group per output row (per-channel)
    quant_meta: bool = False  # scales and zeros in 8 bits, groups of ``meta_group_size`` (HQQ/MXQ style)
    meta_group_size: int = 128
    # Integer zero points for the min-max start and the solver, so that 0 is exactly representable (HQQ's guard may
    # still pick the fractional candidate for a group). Fractional zeros alone (the hqq package at 2/3 bits) bias
    # every near-zero weight of a group the same way: SmolLM2-135M RTN 3-bit g64 goes from 65.9 to 153.6 PPL.
    round_zero: bool = True
    outlier_ratio: float = 0.0  # share of weights kept exactly in FP16 (filled by GWQ)
    hqq: HQQParams = field(default_factory=HQQParams)

    def __post_init__(self) -> None:
        from .quant.packing import check_bits

        if isinstance(self.hqq, dict):
            self.hqq = HQQParams.from_dict(self.hqq)
        if self.method not in METHODS:
            raise SensiquantError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        check_bits(self.bits)
        if self.group_size == -1:
            self.group_size = None
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise SensiquantError(f"group size must be a positive integer or -1 (per-channel), got {self.group_size!r}")
        if self.meta_group_size < 1:
            raise SensiquantError(f"meta group size must be positive, got {self.meta_group_size}")
        if not 0.0 <= self.outlier_ratio < 1.0:
            raise SensiquantError(f"outlier ratio must be in [0, 1), got {self.outlier_ratio}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerSpec:
        return _from_dict(cls, dict(data))


@dataclass
class QuantConfig:
    """A whole-model job: one default LayerSpec, name patterns to skip, per-layer overrides."""

    default: LayerSpec = field(default_factory=LayerSpec)
    skip: list[str] = field(default_factory=lambda: ["lm_head", "*embed*"])
    overrides: dict[str, LayerSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.default, dict):
            self.default = LayerSpec.from_dict(self.default)
        self.overrides = {k: LayerSpec.from_dict(v) if isinstance(v, dict) else v for k, v in self.overrides.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "default": self.default.to_dict(),
            "skip": list(self.skip),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        return _from_dict(cls, dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> QuantConfig:
        return cls.from_dict(json.loads(text))
