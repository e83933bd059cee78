"""Every method has one shape: ``(weight, spec, statistics, outlier mask) -> QuantizedWeight``. A method is a frozen
config dataclass registered with the statistics it needs; :func:`quantize_layer` dispatches on the config's type
and the pipeline gathers only what :func:`needed_statistics` names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..errors import SensiquantError
from ..format.qweight import QuantizedWeight
from ..format.spec import LayerSpec


@dataclass(frozen=True)
class LayerStats:
    """What calibration measured for one layer; each method and saliency declares the fields it needs."""

    hessian: torch.Tensor | None = None  # 2/n X^T X of the layer's calibration inputs, (in, in)
    input_norm: torch.Tensor | None = None  # ||x_j|| over all calibration tokens, (in,)
    grad_abs_sum: torch.Tensor | None = None  # sum over windows of |dL/dW|, (out, in)
    grad_sq_sum: torch.Tensor | None = None  # sum over windows of (dL/dW)^2, (out, in)
    asym_cross: torch.Tensor | None = None  # 2/n (X - X~)^T X~: full-precision minus quantized-model inputs (GPTAQ)


STATISTICS = tuple(f.name for f in fields(LayerStats))


@dataclass(frozen=True)
class _Method:
    name: str
    needs: frozenset[str]
    quantize: Callable[..., QuantizedWeight]


_BY_TYPE: dict[type, _Method] = {}
_BY_NAME: dict[str, type] = {}


def register(config_type: type, name: str, needs: tuple[str, ...] = ()):
    """Decorator: ``fn(w, spec, config, stats, mask) -> QuantizedWeight`` runs configs of ``config_type``."""
    unknown = set(needs) - set(STATISTICS)
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}: choose from {', '.join(STATISTICS)}")

    def decorate(fn):
        _BY_TYPE[config_type] = _Method(name, frozenset(needs), fn)
        _BY_NAME[name] = config_type
        return fn

    return decorate


def _method(config) -> _Method:
    try:
        return _BY_TYPE[type(config)]
    except KeyError:
        raise TypeError(f"{type(config).__name__} is not a registered method config") from None


def method_name(config) -> str:
    return _method(config).name


def needed_statistics(config) -> frozenset[str]:
    """The :class:`LayerStats` fields the method of ``config`` needs."""
    return _method(config).needs


def method_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def method_to_dict(config) -> dict[str, Any]:
    return {"name": method_name(config), **config.to_dict()}


def method_from_dict(data: dict[str, Any]):
    """The method config a :func:`method_to_dict` dict describes (``{"name": "gptq", ...}``)."""
    data = dict(data)
    name = data.pop("name", None)
    if name not in _BY_NAME:
        raise SensiquantError(f"unknown method {name!r}: choose one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name].from_dict(data)


def quantize_layer(w: torch.Tensor, spec: LayerSpec, config, stats: LayerStats | None = None,
                   outlier_mask: torch.Tensor | None = None) -> QuantizedWeight:
    """Quantize one (out, in) weight with the method ``config``; raises ValueError when a statistic is missing."""
    method = _method(config)
    stats = stats or LayerStats()
    missing = sorted(n for n in method.needs if getattr(stats, n) is None)
    if missing:
        raise ValueError(f"method {method.name!r} needs {', '.join(missing)}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    return method.quantize(w, spec, config, stats, outlier_mask)
