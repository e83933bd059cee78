"""Finding and replacing the quantizable linear layers of any torch model."""

from __future__ import annotations

from fnmatch import fnmatch

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
