"""Walking any torch model: its quantizable linear layers, swapping a module, its unique stored tensors."""

from __future__ import annotations

from fnmatch import fnmatch

import torch
from torch import nn


def is_skipped(name: str, skip: list[str]) -> bool:
    """A layer is skipped when a pattern matches its full dotted name or its last component."""
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch(name, pat) or fnmatch(leaf, pat) for pat in skip)


def find_linears(model: nn.Module, skip: list[str] = ()) -> dict[str, nn.Linear]:
    """Every nn.Linear by dotted name, in module order, minus the skipped ones."""
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear) and not is_skipped(name, list(skip))}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (lm_head = embeddings) once, under the first name they appear with."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:
            continue
        seen.add(ptr)
        out[name] = value
    return out


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: unique parameters and persistent buffers (tied weights once)."""
    return sum(v.numel() * v.element_size() for v in unique_state(model).values())
