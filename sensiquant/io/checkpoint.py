"""Quantized checkpoints: a directory of safetensors + JSON, loaded back without re-quantizing.

Layout::

    config.json, tokenizer files     the Hugging Face model config and tokenizer
    model.safetensors                 non-quantized parameters + every QuantLinear's stored tensors
    sensiquant.json                   format version, the QuantConfig, and the per-layer plan (spec, shape, bits)
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..errors import SensiquantError
from ..pipeline.config import QuantConfig
from ..pipeline.report import LayerReport, QuantReport
from ..runtime.qlinear import QuantLinear
from ..runtime.walk import set_module, unique_state
from .safetensors import mmap_safetensors

FORMAT_VERSION = 1
MANIFEST = "sensiquant.json"
WEIGHTS = "model.safetensors"


def save_quantized(model, tokenizer, out_dir: str | Path, config: QuantConfig, report: QuantReport) -> Path:
    """Write the checkpoint; files are written under a temporary name first so a failure leaves nothing half-done."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: value.detach().contiguous().cpu() for name, value in unique_state(model).items()}
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
