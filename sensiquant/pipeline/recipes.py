"""Named recipes: the QuantConfig behind each ``--method``, with the best measured defaults (BENCHMARKS.md).

* ``rtn`` / ``hqq``: round to nearest on the min-max / HQQ grid, 4-bit g64, FP16 scales and zeros.
* ``gptq``: GPTQ (act-order) on the HQQ grid, 3-bit g64 with 8-bit scales/zeros, 16 WikiText-2 windows.
* ``gptaq``: GPTAQ (GPTQ toward the full-precision model's outputs on the quantized model's inputs), same grid.
* ``gwq`` (arXiv 2411.00850): ``gptq`` plus the top 1.9% of every matrix by |gradient| kept as block outliers
  (int8 residuals, 3.593 bits/param on SmolLM2-135M); ``CSR_GWQ_SPEC`` is the paper's form, 0.99% in FP16 (3.598).

Presets (``--preset``) are whole jobs at GWQ's size (3.59 bits/param on SmolLM2-135M), both with 1.9% |gradient|
outliers stored as block residuals: ``fast`` is GPTQ on 2 calibration windows, its grid fits without HQQ's second
(fractional-zero) candidate; ``best`` tunes the HQQ grid's rounding
block by block (SignRound, bf16) on the default 16 windows (BENCHMARKS.md, "Accuracy per byte").
"""

from __future__ import annotations

from ..calib.windows import CalibConfig
from ..errors import SensiquantError
from ..format.spec import LayerSpec
from ..methods.gptaq import GPTAQConfig
from ..methods.gptq import GPTQConfig
from ..methods.outliers import OutlierConfig
from ..methods.round import RoundConfig
from ..methods.signround import SignRoundConfig
from .config import DEFAULT_SKIP, QuantConfig

GPTQ_SPEC = LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True)
RECIPES = ("rtn", "hqq", "gptq", "gptaq", "gwq")
# GWQ's outliers as block residuals (about 17.7 instead of 34 bits each at this share): 1.9% of the weights at
# 3.593 bits/param on SmolLM2-135M, where FP16 CSR bought 0.99% at 3.598 (and lost, BENCHMARKS.md)
GWQ_SPEC = GPTQ_SPEC.replace(outlier_ratio=0.019, outlier_format="block")
CSR_GWQ_SPEC = GPTQ_SPEC.replace(outlier_ratio=0.0099)  # the paper's form: FP16 outliers in CSR
PRESETS = ("fast", "best")


def recipe(name: str, spec: LayerSpec | None = None, skip: tuple[str, ...] = DEFAULT_SKIP,
           method: GPTQConfig | RoundConfig | None = None, outliers: OutlierConfig | None = None,
           calib: CalibConfig | None = None) -> QuantConfig:
    """The QuantConfig of recipe ``name``; any part given replaces the recipe's default for it."""
    if name not in RECIPES:
        raise SensiquantError(f"unknown method {name!r}: choose one of {', '.join(RECIPES)}")
    if name in ("rtn", "hqq"):
        default_spec, default_method = LayerSpec(grid=name), RoundConfig()
    else:
        default_spec = GWQ_SPEC if name == "gwq" else GPTQ_SPEC
        default_method = GPTAQConfig() if name == "gptaq" else GPTQConfig()
    return QuantConfig(method=method or default_method, default=spec or default_spec, skip=tuple(skip),
                       outliers=outliers or OutlierConfig(), calib=calib or CalibConfig())


def gwq(**parts) -> QuantConfig:
    """GWQ with its best measured setting; ``parts`` as in :func:`recipe`."""
    return recipe("gwq", **parts)


def gptq(**parts) -> QuantConfig:
    """GPTQ (act-order, HQQ grid, 3-bit g64 meta8); ``parts`` as in :func:`recipe`."""
    return recipe("gptq", **parts)


def preset(name: str) -> QuantConfig:
    """The QuantConfig of ``--preset name`` (see the module docstring)."""
    if name == "fast":  # one HQQ solve per group fit: the same PPL in less time (BENCHMARKS.md)
        spec = GWQ_SPEC.replace(hqq=GWQ_SPEC.hqq.replace(fractional_candidate=False, iters=10))
        return gwq(spec=spec, calib=CalibConfig(samples=2))
    if name == "best":  # block tuning starts best from the HQQ grid (GPTQ's start tuned worse, BENCHMARKS.md)
        return recipe("hqq", spec=GWQ_SPEC).replace(tuning=SignRoundConfig(compute_dtype="bfloat16"))
    raise SensiquantError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
