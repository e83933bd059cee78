"""Named recipes: the QuantConfig behind each ``--method``, with the best measured defaults (BENCHMARKS.md).

* ``rtn`` / ``hqq``: round to nearest on the min-max / HQQ grid, 4-bit g64, FP16 scales and zeros.
* ``gptq``: GPTQ (act-order) on the HQQ grid, 3-bit g64 with 8-bit scales/zeros, 16 WikiText-2 windows.
* ``gwq`` (arXiv 2411.00850): ``gptq`` plus the top 0.99% of every matrix by |gradient| kept in FP16 (3.598
  bits/param on SmolLM2-135M; 1% would be 3.602).
"""

from __future__ import annotations

from ..calib.windows import CalibConfig
from ..errors import SensiquantError
from ..format.spec import LayerSpec
from ..methods.gptq import GPTQConfig
from ..methods.outliers import OutlierConfig
from ..methods.round import RoundConfig
from .config import DEFAULT_SKIP, QuantConfig

GPTQ_SPEC = LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True)
GWQ_SPEC = GPTQ_SPEC.replace(outlier_ratio=0.0099)
RECIPES = ("rtn", "hqq", "gptq", "gwq")


def recipe(name: str, spec: LayerSpec | None = None, skip: tuple[str, ...] = DEFAULT_SKIP,
           method: GPTQConfig | RoundConfig | None = None, outliers: OutlierConfig | None = None,
           calib: CalibConfig | None = None) -> QuantConfig:
    """The QuantConfig of recipe ``name``; any part given replaces the recipe's default for it."""
    if name not in RECIPES:
        raise SensiquantError(f"unknown method {name!r}: choose one of {', '.join(RECIPES)}")
    if name in ("rtn", "hqq"):
        default_spec, default_method = LayerSpec(grid=name), RoundConfig()
    else:
        default_spec, default_method = (GWQ_SPEC if name == "gwq" else GPTQ_SPEC), GPTQConfig()
    return QuantConfig(method=method or default_method, default=spec or default_spec, skip=tuple(skip),
                       outliers=outliers or OutlierConfig(), calib=calib or CalibConfig())


def gwq(**parts) -> QuantConfig:
    """GWQ with its best measured setting; ``parts`` as in :func:`recipe`."""
    return recipe("gwq", **parts)


def gptq(**parts) -> QuantConfig:
    """GPTQ (act-order, HQQ grid, 3-bit g64 meta8); ``parts`` as in :func:`recipe`."""
    return recipe("gptq", **parts)
