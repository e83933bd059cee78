"""Checkpoints of the tiny LLaMA for the I/O tests, and tools to damage or forge them (the fuzzer's own, from
``bench.fuzz_checkpoint``, plus re-signing and format-1 rewriting)."""

import hashlib
import json
from pathlib import Path

import torch

from bench.fuzz_checkpoint import PROMPT_IDS, make_checkpoints, read_raw_safetensors, write_raw_safetensors
from sensiquant.io import load_quantized
from sensiquant.io.checkpoint import BINDING_KEY, MANIFEST, WEIGHTS, _binding_digest, _manifest_digest


def checkpoint_pair(model_dir: Path, work: Path) -> tuple[Path, Path]:
    """(A, B): A stores every kind of tensor (4-bit g32 + FP16 outliers, 3-bit with 8-bit metadata, plan.json),
    B is plain 2-bit g32."""
    return make_checkpoints(model_dir, work)


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT_IDS])).logits


def references(pair) -> dict[str, torch.Tensor]:
    """The logits of A and of B, loaded from their pristine checkpoints."""
    return {name: logits(load_quantized(path)[0]) for name, path in zip("AB", pair, strict=True)}


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def resign(path: Path) -> None:
    """Recompute every checksum of a (changed) checkpoint, as a buggy writer would: only the structure checks
    can then tell that something is wrong."""
    manifest = json.loads((path / MANIFEST).read_text())
    for name, record in manifest["files"].items():
        if (path / name).is_file():
            data = (path / name).read_bytes()
            record.update(sha256=hashlib.sha256(data).hexdigest(), nbytes=len(data))
    header, body = read_raw_safetensors(path / WEIGHTS)
    header["__metadata__"][BINDING_KEY] = _binding_digest(manifest)
    write_raw_safetensors(path / WEIGHTS, header, body)
    manifest["weights_sha256"] = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _as_format_1(manifest: dict) -> None:
    for key in ("tensors", "weights_sha256", "files", "extra_files", "manifest_sha256"):
        del manifest[key]
    manifest["format_version"] = 1


def to_format_1(path: Path) -> None:
    """Rewrite a checkpoint as sensiquant wrote it before format 2: no tensor list, no checksums, no marker."""
    edit_manifest(path, _as_format_1)
    header, body = read_raw_safetensors(path / WEIGHTS)
    header["__metadata__"] = {"format": "pt", "producer": "sensiquant"}
    write_raw_safetensors(path / WEIGHTS, header, body)
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config, indent=2))

