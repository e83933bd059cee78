"""Quantized checkpoints: a directory of safetensors + JSON, loaded back without re-quantizing.

Layout::

    config.json, tokenizer files     the Hugging Face model config and tokenizer
    model.safetensors                 non-quantized parameters + every QuantLinear's stored tensors
    sensiquant.json                   format version, the QuantConfig, and the per-layer plan (spec, shape, bits)
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .config import QuantConfig
from .errors import SensiquantError
from .nn import QuantLinear
from .quantize import LayerReport, QuantReport
from .walk import set_module

FORMAT_VERSION = 1
MANIFEST = "sensiquant.json"
WEIGHTS = "model.safetensors"


def save_quantized(model, tokenizer, out_dir: str | Path, config: QuantConfig, report: QuantReport) -> Path:
    """Write the checkpoint; files are written under a temporary name first so a failure leaves nothing half-done."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, value in model.state_dict().items():
        ptr = value.data_ptr()
        if ptr in seen and value.numel() > 0:  # tied weights (lm_head = embeddings) are stored once
            continue
        seen[ptr] = name
        tensors[name] = value.detach().contiguous().cpu()
    manifest = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "summary": report.summary(),
        "layers": {name: r.to_dict() for name, r in report.layers.items()},
    }
    tmp = out / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "sensiquant"})
    tmp.replace(out / WEIGHTS)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def read_manifest(path: str | Path) -> dict:
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise SensiquantError(f"not a sensiquant checkpoint (no {MANIFEST}): {path}")
    manifest = json.loads(file.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SensiquantError(f"unsupported checkpoint format {manifest.get('format_version')!r} in {path}")
    return manifest


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a zero-copy view of a private memory map: nothing is read until it is
    touched, and pages never touched never count towards resident memory."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: writable views, file untouched
    start = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise SensiquantError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        count = (end - begin) // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=start + begin) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = flat.view(info["shape"])
    return out


def load_quantized(path: str | Path, trust_remote_code: bool = False):
    """(model, tokenizer) from a checkpoint directory, QuantLinear layers restored from their stored tensors."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    manifest = read_manifest(path)
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    state = mmap_safetensors(path / WEIGHTS)
    report = QuantReport({name: LayerReport.from_dict(d) for name, d in manifest["layers"].items()},
                         manifest["summary"].get("seconds", 0.0))
    for name, layer in report.layers.items():
        prefix = name + "."
        tensors = {k[len(prefix):]: state.pop(k) for k in [k for k in state if k.startswith(prefix)]}
        bias = tensors.pop("bias", None)
        out_features, in_features = layer.shape
        set_module(model, name, QuantLinear(in_features, out_features, layer.spec, tensors, bias))
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise SensiquantError(f"checkpoint has tensors the model does not: {unexpected[:5]}")
    model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise SensiquantError(f"checkpoint is missing tensors: {left[:5]}")
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    model.sensiquant_report = report
    return model, tokenizer
