"""How one weight matrix is stored: :class:`LayerSpec` (bits, groups, metadata precision, outlier share, and the
grid fit its scales and zeros came from). Frozen: derive variants with ``spec.replace(...)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import SensiquantError
from ..serialize import Config, coerce
from .ggml import fit_type, ggml_type
from .packing import SUPPORTED_BITS

GRIDS = ("rtn", "hqq")  # how a group's (scale, zero) is fitted: min-max, or the half-quadratic solver
OUTLIER_FORMATS = ("csr", "block")  # FP16 values in CSR, or int8 residuals on the codes in blocks (format/qweight.py)


def check_bits(bits) -> int:
    """A supported code width, or one clear error (configs and ladder rungs share this check)."""
    if bits not in SUPPORTED_BITS or isinstance(bits, bool):
        raise SensiquantError(f"unsupported bit width {bits!r}: choose one of {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


@dataclass(frozen=True)
class HQQParams(Config):
    """Half-quadratic solver settings and the guard policy that makes HQQ beat RTN (README, "HQQ defaults")."""

    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.01
    iters: int = 20
    early_stop: bool = True
    # Also update the dequantization scale (least squares on the shrunk target); the package keeps it fixed.
    optimize_scale: bool = True
    # Keep, per group, whichever candidate (min-max start, solver results) has the lowest guard error.
    # Off reproduces the hqq package; on guarantees HQQ is never worse than its min-max (RTN) start per group.
    l2_guard: bool = True
    # With integer zeros, also offer the guard the package's fractional-zero solution.
    fractional_candidate: bool = True
    # The guard's error adds guard_bias_weight * (sum of a group's errors)^2 to the squared error: the extra output
    # error a coherent shift of the group's weights causes when the inputs have a non-zero mean. 0 (pure L2) loses
    # to RTN at 3-bit g128 (BENCHMARKS.md, "HQQ").
    guard_bias_weight: float = 1.0


@dataclass(frozen=True)
class LayerSpec(Config):
    """How one weight matrix is stored: codes of ``bits`` bits in groups of ``group_size`` input columns, FP16 or
    8-bit scales/zeros, and a share of weights kept (nearly) exactly as outliers in ``outlier_format``; ``grid``
    says how scales/zeros are fitted."""

    grid: str = "hqq"
    bits: int = 4
    group_size: int | None = 64  # None (or -1): one group per output row (per-channel)
    quant_meta: bool = False  # scales and zeros in 8 bits, groups of ``meta_group_size`` (HQQ/MXQ style)
    meta_group_size: int = 128
    # Integer zero points for the min-max start and the solver, so that 0 is exactly representable. Fractional
    # zeros alone (the hqq package at 2/3 bits) bias every near-zero weight of a group the same way (BENCHMARKS.md).
    round_zero: bool = True
    outlier_ratio: float = 0.0  # share of weights kept as outliers (the pipeline picks them)
    hqq: HQQParams = field(default_factory=HQQParams)
    # how outliers are stored: "csr" (FP16 values, exact) or "block" (int8 residuals on the codes, compact)
    outlier_format: str = "csr"
    # a llama.cpp block type (format/ggml.py: "Q4_0", "Q4_K", ...): codes and scales stored as that type stores
    # them, so the matrix exports to GGUF as it is. It sets bits and group size; no 8-bit metadata, no outliers.
    gguf: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.hqq, dict):
            coerce(self, "hqq", HQQParams.from_dict(self.hqq))
        if self.grid not in GRIDS:
            raise SensiquantError(f"unknown grid {self.grid!r}: choose one of {', '.join(GRIDS)}")
        if self.gguf is not None:
            t = ggml_type(self.gguf)
            if self.quant_meta or self.outlier_ratio:
                raise SensiquantError(f"GGUF type {t.name} stores its own scales and no outliers: drop 8-bit "
                                      "metadata and the outlier ratio")
            coerce(self, "bits", t.bits)
            coerce(self, "group_size", t.group)
        else:
            check_bits(self.bits)
        if self.group_size == -1:
            coerce(self, "group_size", None)
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or self.group_size < 1):
            raise SensiquantError(f"group size must be a positive integer or -1 (per-channel), got {self.group_size!r}")
        if not isinstance(self.meta_group_size, int) or self.meta_group_size < 1:
            raise SensiquantError(f"meta group size must be a positive integer, got {self.meta_group_size!r}")
        if not (isinstance(self.outlier_ratio, int | float) and 0.0 <= self.outlier_ratio < 0.5):
            raise SensiquantError(f"outlier ratio must be in [0, 0.5), got {self.outlier_ratio!r}")
        if self.outlier_format not in OUTLIER_FORMATS:
            raise SensiquantError(f"unknown outlier format {self.outlier_format!r}: choose one of "
                                  f"{', '.join(OUTLIER_FORMATS)}")

    def fitted(self, in_features: int) -> LayerSpec:
        """This spec for rows of ``in_features``: a GGUF type whose blocks do not tile them becomes llama.cpp's
        fallback type (``format/ggml.py``); any other spec is itself."""
        if self.gguf is None:
            return self
        fitted = fit_type(self.gguf, in_features)
        return self if fitted == self.gguf else self.replace(gguf=fitted)

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int | None) -> dict[str, Any]:
        if version is None and "method" in data:  # checkpoints before version 1 called the grid "method"
            data["grid"] = data.pop("method")
        return data
