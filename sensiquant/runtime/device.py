"""Which device a run works on: ``auto`` (a GPU where one is present, else the CPU), ``cpu``, ``cuda``,
``cuda:N``; and moving calibration batches to the device of the model they feed."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SensiquantError

DEFAULT_DEVICE = "auto"


def resolve_device(name: str | torch.device | None = DEFAULT_DEVICE) -> torch.device:
    """The torch device ``name`` stands for, checked to exist here (one clear error if it does not)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise SensiquantError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SensiquantError(f"device {name} is not available: this torch ({torch.__version__}) sees no CUDA "
                                  "GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SensiquantError(f"device {name} is not available: {torch.cuda.device_count()} CUDA GPU(s) here")
    elif device.type != "cpu":
        raise SensiquantError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batches, device: torch.device):
    """Calibration windows (a tensor) or input dicts with their tensors moved to ``device``."""
    if isinstance(batches, torch.Tensor):
        return batches.to(device)
    return [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
