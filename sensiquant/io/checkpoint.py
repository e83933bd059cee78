"""Quantized checkpoints: a directory of safetensors + JSON, written atomically, checked whenever it is loaded.

Layout::

    config.json, tokenizer files      the Hugging Face model config (``quantization_config`` with ``quant_method:
                                      "sensiquant"``, see :mod:`sensiquant.io.hf`) and tokenizer
    README.md                         the model card (:mod:`sensiquant.io.card`), rendered from the manifest;
                                      checksummed with the extra files (hashed by verify, not by every load)
    model.safetensors                 non-quantized parameters + every QuantLinear's stored tensors
    sensiquant.json                   the manifest: format version, the QuantConfig, the per-layer record (shape,
                                      spec, stored bits), every stored tensor (dtype, shape, bytes), the sha256 of
                                      every file, and a checksum of itself
    plan.json, ...                    extra files the caller asked for (their sha256 are in the manifest too)

Writing (:func:`save_quantized`): everything goes into a hidden temporary sibling of the target directory, is
flushed to disk, checked as a load would check it, and only then put in place, by one atomic rename or, over an
existing checkpoint, one atomic exchange (``renameat2(RENAME_EXCHANGE)``). The previous checkpoint stays complete
until the new one is; a save killed half-way leaves at most a hidden sibling, which the next save there removes.

Loading (:func:`load_quantized`) always checks, without reading the weights: the manifest's schema and checksum;
that the safetensors header lists exactly the tensors of the manifest; that every quantized layer stores exactly the
tensors its spec and shape require (packed code bytes, scale/zero shapes or 8-bit metadata sizes, outlier CSR or
block lengths) and the bits the accounting gives; that the weights file and the small files (config, tokenizer) are
the ones this manifest was written with; that every tensor fits the model. Of the tensors it reads only the outlier
indices: CSR row pointers and columns, or block counts (adding up to the outliers), offsets (ascending in each
block, inside the matrix) and the residual scale (finite, positive). ``verify=True`` (and :func:`verify_checkpoint`)
also hashes the weights. Any mismatch is one :class:`SensiquantError`.

Format 1 (before checksums) still loads: the structure checks apply, there is nothing to hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import SensiquantError
from ..format.accounting import storage_bits, stored_tensors
from ..format.qweight import OUTLIER_BLOCK
from ..format.spec import LayerSpec
from ..pipeline.config import QuantConfig
from ..pipeline.report import LayerReport, QuantReport
from ..runtime.qlinear import QuantLinear
from ..runtime.walk import set_module, unique_state
from .atomic import make_parent, replacing_directory
from .card import CARD, check_card, render_card
from .safetensors import (
    DTYPE_NAMES,
    SafetensorsHeader,
    TensorInfo,
    dtype_name,
    mmap_safetensors,
    parse_json,
    read_json_file,
    read_safetensors_header,
    torch_dtype,
    write_safetensors,
)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "sensiquant.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PRODUCER = "sensiquant"
QUANT_METHOD = "sensiquant"
# Written into config.json as its ``quantization_config``: after ``import sensiquant``, transformers'
# from_pretrained hands the checkpoint to sensiquant's quantizer (sensiquant/io/hf.py). Checkpoints before the
# transformers integration carry {"format": "sensiquant", ...} without a quant_method (load_quantized only).
QUANTIZATION_MARKER = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "manifest": MANIFEST,
                       "load_with": "import sensiquant; AutoModelForCausalLM.from_pretrained(path)"}
# Also written into config.json, as ``transformers_weights`` (the weights file transformers is told to load). A
# transformers that does not know quant_method "sensiquant" only warns and would build the packed layers as random
# nn.Linear weights; this value is no weights file name, so it stops instead, with this text in its error. The
# quantizer puts the real name back before transformers looks for the weights.
WEIGHTS_GUARD = (f"{WEIGHTS} of a sensiquant checkpoint: run `import sensiquant` before from_pretrained "
                 "(pip install sensiquant)")
BINDING_KEY = "sensiquant_manifest_sha256"  # in the safetensors metadata: ties the weights to their manifest
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FLOATS = ("F16", "BF16", "F32", "F64")
_RESERVED = (WEIGHTS, MANIFEST, CONFIG, CARD)


# ----------------------------------------------------------------------------------------------------------- saving


def save_quantized(model, tokenizer, out_dir: str | Path, config: QuantConfig, report: QuantReport,
                   extra_files: dict[str, str] | None = None, card: dict | None = None) -> Path:
    """Write the checkpoint of a quantized ``model`` to ``out_dir``, whole or not at all; returns its path.

    ``out_dir`` may not exist yet, be empty, or hold a sensiquant checkpoint (which is replaced; whether that is
    allowed is the caller's decision). Anything else is refused. ``extra_files`` are text files written beside the
    checkpoint (e.g. ``{"plan.json": plan.to_json()}``) and covered by its checksums. ``card`` holds what the
    model card (README.md) shows beyond the config and the report: ``base_model`` (default: the model's
    ``name_or_path``) and ``perplexity`` ({text name: PerplexityResult}); it is kept in the manifest too.
    """
    out = Path(os.path.realpath(os.fspath(out_dir)))
    _check_replaceable(out)
    extra = _check_extra_files(extra_files or {})
    card = check_card(card)
    if "base_model" not in card:  # a model loaded from a checkpoint names that checkpoint's base model
        source = getattr(model, "sensiquant_source", None)
        base = source.manifest.get("card", {}).get("base_model") if source is not None else None
        base = base or getattr(model, "name_or_path", None)
        if base:
            card["base_model"] = str(base)
    make_parent(out, "the checkpoint")
    try:
        with replacing_directory(out) as tmp:
            _write_checkpoint(tmp, model, tokenizer, config, report, extra, card)
    except (OSError, SafetensorError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SensiquantError(f"could not write the checkpoint {out}: {reason}") from None
    return out


def _check_replaceable(out: Path) -> None:
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise SensiquantError(f"cannot write the checkpoint to {out}: it is a file, not a directory")
    try:
        entries = os.listdir(out)
    except OSError as exc:
        raise SensiquantError(f"cannot read {out}: {exc.strerror}") from None
    if entries and not (out / MANIFEST).is_file():
        raise SensiquantError(f"refusing to replace {out}: it is not empty and not a sensiquant checkpoint "
                              f"(no {MANIFEST})")


def _check_extra_files(extra: dict[str, str]) -> dict[str, str]:
    for name, text in extra.items():
        if not isinstance(name, str) or not name or name != Path(name).name or name.startswith(".") \
                or name in _RESERVED:
            raise SensiquantError(f"extra checkpoint file {name!r}: must be a plain file name other than "
                                  f"{', '.join(_RESERVED)}")
        if not isinstance(text, str):
            raise SensiquantError(f"extra checkpoint file {name}: expected text, got {type(text).__name__}")
    return dict(extra)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _checked_sha256(path: Path) -> str:
    """The sha256 of a checkpoint file being checked: an unreadable file is one SensiquantError."""
    try:
        return _sha256_file(path)
    except OSError as exc:
        raise SensiquantError(f"cannot read {path}: {exc.strerror}") from None


def _canonical_sha256(obj) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _binding_digest_v2(manifest: dict) -> str:
    """The binding written before resume existed: everything but the parts that describe the weights file."""
    return _canonical_sha256({k: v for k, v in manifest.items()
                              if k not in ("tensors", "weights_sha256", "manifest_sha256")})


def _binding_digest_v3(manifest: dict) -> str:
    """The binding written from resume until streaming: the run's timings and resumption left out."""
    summary = {k: v for k, v in manifest.get("summary", {}).items()
               if k != "seconds" and not k.endswith("_seconds") and k != "resumed"}
    return _canonical_sha256({**{k: v for k, v in manifest.items()
                                 if k not in ("tensors", "weights_sha256", "manifest_sha256")}, "summary": summary})


def _binding_digest(manifest: dict) -> str:
    """What the weights file records of its manifest: everything that describes the model, not the run's timings
    nor whether it was resumed or streamed, nor the calibration loss (its last bits depend on the order of the
    sums), so that an interrupted and resumed run (or a streamed one) writes the very same weights file as an
    uninterrupted in-memory one (the manifest digest still covers all of it)."""
    summary = {k: v for k, v in manifest.get("summary", {}).items()
               if k != "seconds" and not k.endswith("_seconds") and k not in ("resumed", "streamed", "calib_loss")}
    card = dict(manifest.get("card", {}))
    if isinstance(card.get("perplexity"), dict):  # the scores stay bound, the seconds they took do not
        card["perplexity"] = {name: {k: v for k, v in r.items() if k != "seconds"} if isinstance(r, dict) else r
                              for name, r in card["perplexity"].items()}
    return _canonical_sha256({**{k: v for k, v in manifest.items()
                                 if k not in ("tensors", "weights_sha256", "manifest_sha256")}, "summary": summary,
                              "card": card})


def _manifest_digest(manifest: dict) -> str:
    return _canonical_sha256({k: v for k, v in manifest.items() if k != "manifest_sha256"})


def _file_records(root: Path, names: list[str]) -> dict[str, dict]:
    return {name: {"sha256": _sha256_file(root / name), "nbytes": (root / name).stat().st_size} for name in names}


def _relative_files(root: Path) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            out.append((Path(dirpath) / filename).relative_to(root).as_posix())
    return sorted(out)


def _write_checkpoint(tmp: Path, model, tokenizer, config: QuantConfig, report: QuantReport,
                      extra: dict[str, str], card: dict) -> None:
    model.config.save_pretrained(tmp)  # as transformers writes it (custom code of remote-code configs included)
    hf_config = parse_json((tmp / CONFIG).read_bytes(), str(tmp / CONFIG))
    hf_config["quantization_config"] = dict(QUANTIZATION_MARKER)
    hf_config["transformers_weights"] = WEIGHTS_GUARD
    (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name in extra:
        if (tmp / name).exists():
            raise SensiquantError(f"extra checkpoint file {name} clashes with a file of the tokenizer")
    for name, text in extra.items():
        (tmp / name).write_text(text)
    described = json.loads(json.dumps({  # exactly what a reader will see (tuples -> lists, ...)
        "config": config.to_dict(),
        "summary": report.summary(),
        "layers": {name: r.to_dict() for name, r in report.layers.items()},
        "card": card,
    }))
    # the card is checksummed as an extra file: hashed by verify, not on every load, so that an edited card (as
    # hubs invite) does not stop the model from loading
    (tmp / CARD).write_text(render_card(**described))
    model_files = [name for name in _relative_files(tmp) if name not in extra and name != CARD]
    core = {
        "format_version": FORMAT_VERSION,
        **described,
        "files": _file_records(tmp, model_files),
        "extra_files": _file_records(tmp, sorted([*extra, CARD])),
    }
    tensors = {name: value.detach().contiguous().cpu() for name, value in unique_state(model).items()}
    metadata = {"format": "pt", "producer": PRODUCER, "sensiquant_format_version": str(FORMAT_VERSION),
                BINDING_KEY: _binding_digest(core)}
    write_safetensors(tensors, tmp / WEIGHTS, metadata)
    header = read_safetensors_header(tmp / WEIGHTS)
    manifest = {**core,
                "tensors": {name: {"dtype": info.dtype, "shape": list(info.shape), "nbytes": info.nbytes}
                            for name, info in header.tensors.items()},
                "weights_sha256": _sha256_file(tmp / WEIGHTS)}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    # the writer's own check: what a load will check, before anything is put in place
    layers = _check_manifest(manifest, tmp / MANIFEST)
    _check_structure(manifest, header)
    _check_summary(manifest["summary"], layers, tmp / MANIFEST)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------- checking


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise SensiquantError(message)


def _check_shape(value, what: str, rank: int | None = None, positive: bool = False) -> tuple[int, ...]:
    _require(isinstance(value, list) and all(_is_int(d) and (d > 0 if positive else d >= 0) for d in value)
             and (rank is None or len(value) == rank),
             f"{what}: shape {value!r} is not a list of {rank or 'any number of'} "
             f"{'positive' if positive else 'non-negative'} integers")
    return tuple(value)


def _check_file_records(records, what: str) -> None:
    _require(isinstance(records, dict), f"{what} must be a JSON object")
    for name, record in records.items():
        _require(name and not name.startswith("/") and ".." not in Path(name).parts and name not in (WEIGHTS, MANIFEST),
                 f"{what}: bad file name {name!r}")
        _require(isinstance(record, dict) and isinstance(record.get("sha256"), str)
                 and bool(_SHA256.match(record["sha256"])) and _is_int(record.get("nbytes"))
                 and record["nbytes"] >= 0, f"{what}: bad entry for {name!r}")


def _layer_reports(layers: dict, where: Path) -> dict[str, LayerReport]:
    out = {}
    for name, entry in layers.items():
        what = f"{where}: layer {name}"
        _require(isinstance(entry, dict), f"{what} is not a JSON object")
        shape = _check_shape(entry.get("shape"), what, rank=2, positive=True)
        _require("spec" in entry, f"{what} has no spec")
        try:
            spec = LayerSpec.from_dict(entry["spec"])
        except SensiquantError as exc:
            raise SensiquantError(f"{what}: {exc}") from None
        bits, n_outliers = entry.get("bits"), entry.get("n_outliers", 0)
        _require(_is_int(bits) and bits >= 0, f"{what}: bits {bits!r} is not a non-negative integer")
        _require(_is_int(n_outliers) and 0 <= n_outliers <= shape[0] * shape[1],
                 f"{what}: n_outliers {n_outliers!r} is not an integer in [0, {shape[0] * shape[1]}]")
        expected = storage_bits(shape, spec, n_outliers)
        _require(bits == expected, f"{what}: the manifest says {bits} stored bits, but a {shape[0]}x{shape[1]} matrix "
                                   f"at {spec.bits} bits, group size {spec.group_size}, with {n_outliers} outliers "
                                   f"stores {expected}")
        out[name] = LayerReport(shape, spec, bits, n_outliers)
    return out


def _check_summary(summary: dict, layers: dict[str, LayerReport], where: Path) -> None:
    derived = QuantReport(layers).summary()
    for key in ("n_layers", "quantized_params", "quantized_bytes", "bits_per_param", "n_outliers"):
        value = derived[key]
        if key in summary:
            stored = summary[key]
            _require(_is_number(stored) and math.isclose(stored, value, rel_tol=1e-12, abs_tol=1e-12),
                     f"{where}: summary {key} is {stored!r}, but its layers give {value!r}")
    _require(_is_number(summary.get("seconds", 0.0)), f"{where}: summary seconds is not a number")


def _check_manifest(manifest, where: Path) -> dict[str, LayerReport]:
    """The manifest's schema, and the per-layer bits against the accounting; returns the layer records. (The
    summary is checked apart, after the tensors: its message is the less specific one.)"""
    _require(isinstance(manifest, dict), f"{where} is not a JSON object")
    version = manifest.get("format_version")
    _require(_is_int(version) and version in READABLE_FORMATS,
             f"unsupported checkpoint format {version!r} in {where} (this sensiquant reads "
             f"{', '.join(map(str, READABLE_FORMATS))})")
    for key in ("config", "summary", "layers"):
        _require(isinstance(manifest.get(key), dict), f"{where}: {key!r} is missing or not a JSON object")
    _require(isinstance(manifest.get("card", {}), dict), f"{where}: 'card' is not a JSON object")
    if version >= 2:
        for key in ("tensors", "files", "extra_files"):
            _require(isinstance(manifest.get(key), dict), f"{where}: {key!r} is missing or not a JSON object")
        for key in ("weights_sha256", "manifest_sha256"):
            value = manifest.get(key)
            _require(isinstance(value, str) and bool(_SHA256.match(value)), f"{where}: {key!r} is not a sha256")
        for name, entry in manifest["tensors"].items():
            what = f"{where}: tensor {name!r}"
            _require(isinstance(entry, dict), f"{what} is not a JSON object")
            dtype = entry.get("dtype")
            _require(isinstance(dtype, str) and dtype in DTYPE_NAMES.values(), f"{what}: unknown dtype {dtype!r}")
            shape = _check_shape(entry.get("shape"), what)
            nbytes = entry.get("nbytes")
            _require(_is_int(nbytes) and nbytes == math.prod(shape) * torch_dtype(dtype).itemsize,
                     f"{what}: nbytes {nbytes!r} does not match {dtype} x {list(shape)}")
        _check_file_records(manifest["files"], f"{where}: files")
        _check_file_records(manifest["extra_files"], f"{where}: extra_files")
    return _layer_reports(manifest["layers"], where)


def expected_layer_tensors(shape: tuple[int, int], spec: LayerSpec, n_outliers: int) -> dict[str, tuple]:
    """(safetensors dtype, shape) of every tensor a quantized layer stores (bias aside): the accounting's
    :func:`~sensiquant.format.stored_tensors`, named as the safetensors header names dtypes."""
    stored = stored_tensors(shape, spec, n_outliers)
    return {name: (dtype_name(dtype), dims) for name, (dtype, dims) in stored.items()}


def _describe(info: tuple) -> str:
    return f"{info[0]} {list(info[1])}"


def _check_structure(manifest: dict, header: SafetensorsHeader) -> None:
    """The weights file against the manifest: the tensor list (format 2), and every quantized layer's tensors
    against what its spec and shape require."""
    where = header.path
    if manifest["format_version"] >= 2:
        listed = manifest["tensors"]
        stored = header.tensors
        missing = sorted(set(listed) - set(stored))
        extra = sorted(set(stored) - set(listed))
        _require(not missing, f"{where} lacks tensors its manifest lists: {', '.join(missing[:5])}")
        _require(not extra, f"{where} holds tensors its manifest does not list: {', '.join(extra[:5])}")
        for name, entry in listed.items():
            info = stored[name]
            _require(info.dtype == entry["dtype"] and list(info.shape) == entry["shape"]
                     and info.nbytes == entry["nbytes"],
                     f"{where}: tensor {name} is {info.dtype} {list(info.shape)} ({info.nbytes} bytes), the manifest "
                     f"says {entry['dtype']} {entry['shape']} ({entry['nbytes']} bytes)")
    groups: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        module, _, leaf = name.rpartition(".")
        groups.setdefault(module, {})[leaf] = info
    layers = manifest["layers"]
    for module, leaves in groups.items():
        _require("qweight" not in leaves or module in layers,
                 f"{where}: {module}.qweight is a quantized tensor of no layer in the manifest")
    for name, entry in layers.items():
        shape, spec = tuple(entry["shape"]), LayerSpec.from_dict(entry["spec"])
        n_outliers = entry.get("n_outliers", 0)
        expected = expected_layer_tensors(shape, spec, n_outliers)
        stored = dict(groups.get(name, {}))
        bias = stored.pop("bias", None)
        what = f"layer {name} ({spec.bits}-bit, group size {spec.group_size}, {shape[0]}x{shape[1]})"
        for leaf, want in expected.items():
            info = stored.get(leaf)
            _require(info is not None, f"{where}: {what} has no {leaf} tensor")
            have = (info.dtype, info.shape)
            _require(have == want, f"{where}: {what}: {leaf} is {_describe(have)}, its spec and shape need "
                                   f"{_describe(want)}")
        unexpected = sorted(set(stored) - set(expected))
        _require(not unexpected, f"{where}: {what} stores tensors its spec does not have: {', '.join(unexpected)}")
        if bias is not None:
            _require(bias.dtype in _FLOATS and bias.shape == (shape[0],),
                     f"{where}: {what}: bias is {bias.dtype} {list(bias.shape)}, expected a float [{shape[0]}]")


def _check_files(path: Path, records: dict[str, dict], what: str) -> None:
    for name, record in records.items():
        file = path / name
        _require(file.is_file(), f"{path}: {name} is missing ({what} of this checkpoint)")
        _require(file.stat().st_size == record["nbytes"] and _checked_sha256(file) == record["sha256"],
                 f"{file} is not the file this checkpoint was saved with (sha256 mismatch): it was changed, "
                 "damaged or comes from another checkpoint")


@dataclass
class _Checked:
    """What the cheap checks established about a checkpoint directory."""

    path: Path
    manifest: dict
    layers: dict[str, LayerReport]
    header: SafetensorsHeader

    @property
    def format_version(self) -> int:
        return self.manifest["format_version"]


def _read_manifest_unchecked(path: Path) -> tuple[dict, dict[str, LayerReport]]:
    _require(path.is_dir(), f"checkpoint not found: {path} is not a directory")
    file = path / MANIFEST
    _require(file.is_file(), f"not a sensiquant checkpoint (no {MANIFEST}): {path}")
    manifest = read_json_file(file)
    return manifest, _check_manifest(manifest, file)


def _check_manifest_digest(manifest: dict, path: Path) -> None:
    if manifest["format_version"] >= 2:
        _require(_manifest_digest(manifest) == manifest["manifest_sha256"],
                 f"{path / MANIFEST} does not match its own checksum: it was edited or is damaged")


def read_manifest(path: str | Path) -> dict:
    """The manifest (``sensiquant.json``) of a checkpoint directory, its schema, accounting and checksum checked."""
    path = Path(path)
    manifest, layers = _read_manifest_unchecked(path)
    _check_summary(manifest["summary"], layers, path / MANIFEST)
    _check_manifest_digest(manifest, path)
    return manifest


def _inspect(path: Path) -> _Checked:
    """Every check that reads no tensor data: see the module docstring."""
    manifest, layers = _read_manifest_unchecked(path)
    header = read_safetensors_header(path / WEIGHTS)
    _check_structure(manifest, header)
    _check_summary(manifest["summary"], layers, path / MANIFEST)
    _check_manifest_digest(manifest, path)
    binding = header.metadata.get(BINDING_KEY)
    if manifest["format_version"] >= 2:
        _require(binding in (_binding_digest(manifest), _binding_digest_v3(manifest), _binding_digest_v2(manifest)),
                 f"{path / WEIGHTS} does not belong to {path / MANIFEST} (the weights were written with another "
                 "manifest): the checkpoint is a mix of two saves or was damaged")
        _check_files(path, manifest["files"], "a model file")
    else:
        _require(binding is None, f"{path / WEIGHTS} was written with a newer manifest than {path / MANIFEST}")
        _require((path / CONFIG).is_file(), f"{path}: {CONFIG} is missing")
    return _Checked(path, manifest, layers, header)


def _check_weights_hash(checked: _Checked) -> dict:
    path, manifest = checked.path, checked.manifest
    if checked.format_version < 2:
        return {"sha256_ok": None, "checksum": f"format {checked.format_version} checkpoints carry no checksum"}
    digest = _checked_sha256(path / WEIGHTS)
    _require(digest == manifest["weights_sha256"],
             f"{path / WEIGHTS} does not match the sha256 in {MANIFEST}: its tensor data is damaged")
    _check_files(path, manifest["extra_files"], "an extra file")
    return {"sha256_ok": True, "weights_sha256": digest}


def _empty_model(path: Path, trust_remote_code: bool):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise SensiquantError(f"{path / CONFIG} does not describe a model transformers can build: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
            from None


def _check_against_model(model: nn.Module, checked: _Checked) -> None:
    """Every stored tensor has a place in the model: quantized layers are linears of their shape, the other
    tensors are parameters or buffers of the model with the same shape."""
    where = checked.path / WEIGHTS
    quantized = set()
    for name, layer in checked.layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SensiquantError(f"{where}: layer {name} is not a module of this {type(model).__name__}") from None
        _require(isinstance(module, nn.Linear), f"{where}: layer {name} is a {type(module).__name__}, not a linear")
        _require((module.out_features, module.in_features) == layer.shape,
                 f"{where}: layer {name} is {layer.shape[0]}x{layer.shape[1]} in the checkpoint, "
                 f"{module.out_features}x{module.in_features} in the model")
        has_bias = f"{name}.bias" in checked.header.tensors
        _require(has_bias == (module.bias is not None),
                 f"{where}: layer {name} {'has' if has_bias else 'lacks'} a bias, the model's "
                 f"{'does not' if has_bias else 'does'}")
        quantized.add(name)
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, info in checked.header.tensors.items():
        if name.rpartition(".")[0] in quantized:
            continue
        _require(name in state, f"{where}: tensor {name} is not a parameter or buffer of this {type(model).__name__}")
        _require(info.shape == state[name],
                 f"{where}: tensor {name} is {list(info.shape)}, the model needs {list(state[name])}")


def _check_outliers(name: str, tensors: dict[str, torch.Tensor], layer: LayerReport, where: Path) -> None:
    if not layer.n_outliers:
        return
    if layer.spec.outlier_format == "block":
        _check_block_outliers(name, tensors, layer, where)
        return
    row_ptr = tensors["outlier_row_ptr"].long()
    col_idx = tensors["outlier_col_idx"].long()
    ok = int(row_ptr[0]) == 0 and int(row_ptr[-1]) == layer.n_outliers and bool((row_ptr[1:] >= row_ptr[:-1]).all())
    _require(ok, f"{where}: layer {name}: outlier row pointers are not a CSR index of {layer.n_outliers} values")
    _require(bool(((col_idx >= 0) & (col_idx < layer.shape[1])).all()),
             f"{where}: layer {name}: outlier column indices outside [0, {layer.shape[1]})")


def _check_block_outliers(name: str, tensors: dict[str, torch.Tensor], layer: LayerReport, where: Path) -> None:
    """Block counts add up to the outliers, offsets ascend within each block and stay inside the matrix (so the
    positions ascend overall), the residual scale is a finite positive number."""
    counts = tensors["outlier_counts"].long()
    total = int(counts.sum())
    _require(total == layer.n_outliers,
             f"{where}: layer {name}: outlier block counts add up to {total}, not to its {layer.n_outliers} outliers")
    blocks = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    positions = blocks * OUTLIER_BLOCK + tensors["outlier_offsets"].long()
    _require(bool((positions[1:] > positions[:-1]).all()) and int(positions[-1]) < layer.shape[0] * layer.shape[1],
             f"{where}: layer {name}: outlier offsets do not ascend within their blocks or fall outside the "
             f"{layer.shape[0]}x{layer.shape[1]} matrix")
    scale = tensors["outlier_scale"].float()
    _require(bool(torch.isfinite(scale).all()) and bool((scale > 0).all()),
             f"{where}: layer {name}: outlier residual scale {float(scale[0])!r} is not a finite positive number")


def _by_layer(tensors: dict[str, torch.Tensor], layers) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """The stored tensors of every quantized layer (by leaf name, bias included), and all the others."""
    per_layer: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    rest = {}
    for key, value in tensors.items():
        module, _, leaf = key.rpartition(".")
        if module in per_layer:
            per_layer[module][leaf] = value
        else:
            rest[key] = value
    return per_layer, rest


def verify_checkpoint(path: str | Path, trust_remote_code: bool = False) -> dict:
    """Check a checkpoint completely without loading it: everything :func:`load_quantized` checks, plus the sha256
    of the weights and of the extra files. Returns a summary; raises SensiquantError on any mismatch. Format-1
    checkpoints pass with ``sha256_ok`` None (they carry no checksum)."""
    path = Path(path)
    checked = _inspect(path)
    hashed = _check_weights_hash(checked)
    model = _empty_model(path, trust_remote_code)
    _check_against_model(model, checked)
    per_layer, _ = _by_layer(mmap_safetensors(path / WEIGHTS, checked.header), checked.layers)
    for name, layer in checked.layers.items():
        _check_outliers(name, per_layer[name], layer, path / WEIGHTS)
    files = sorted(checked.manifest.get("files", {})) + sorted(checked.manifest.get("extra_files", {}))
    listed = set(files) | {WEIGHTS, MANIFEST}
    return {"path": str(path), "format_version": checked.format_version, "layers": len(checked.layers),
            "tensors": len(checked.header.tensors), "bytes": checked.header.file_size,
            "files": files, "unlisted_files": [f for f in _relative_files(path) if f not in listed], **hashed}


# ----------------------------------------------------------------------------------------------------------- loading


def _manifest_report(checked: _Checked) -> QuantReport:
    """The QuantReport a checkpoint was saved with: its layer records, seconds, and the summary's extras (plan)."""
    summary = checked.manifest["summary"]
    derived = set(QuantReport().summary())
    return QuantReport(checked.layers, summary.get("seconds", 0.0),
                       {k: v for k, v in summary.items() if k not in derived})


def _install_quant_linears(model: nn.Module, checked: _Checked) -> dict[str, torch.Tensor]:
    """Put a QuantLinear built from its stored tensors (memory-mapped) in place of every quantized linear of
    ``model``, once every stored tensor is known to fit the model and every outlier index is sound; returns the
    other stored tensors by name."""
    _check_against_model(model, checked)
    per_layer, state = _by_layer(mmap_safetensors(checked.path / WEIGHTS, checked.header), checked.layers)
    for name, layer in checked.layers.items():
        tensors = per_layer[name]
        _check_outliers(name, tensors, layer, checked.path / WEIGHTS)
        bias = tensors.pop("bias", None)
        out_features, in_features = layer.shape
        set_module(model, name, QuantLinear(in_features, out_features, layer.spec, tensors, bias))
    return state


def _check_complete(model: nn.Module, checked: _Checked, tied) -> None:
    """Every parameter and persistent buffer of ``model`` (quantized linears in place) is stored, but the ``tied``
    ones (which share another's tensor): a loader that fills missing tensors at random gets none to fill."""
    missing = [name for name in model.state_dict() if name not in checked.header.tensors and name not in tied]
    _require(not missing, f"{checked.path / WEIGHTS} is missing tensors of the model: {', '.join(missing[:5])}")


def _check_loaded(model: nn.Module, checked: _Checked) -> None:
    """After another loader (transformers) filled ``model``: every quantized layer is a QuantLinear holding its
    tensors with the dtype and shape of the file, and no tensor is left on the meta device."""
    where = checked.path / WEIGHTS
    for name in checked.layers:
        module = model.get_submodule(name)
        _require(isinstance(module, QuantLinear), f"{where}: layer {name} was loaded as a {type(module).__name__}")
        tensors = dict(module.stored_tensors())
        if module.bias is not None:
            tensors["bias"] = module.bias
        for leaf, value in tensors.items():
            info = checked.header.tensors[f"{name}.{leaf}"]
            _require(value.device.type != "meta" and DTYPE_NAMES.get(value.dtype) == info.dtype
                     and tuple(value.shape) == info.shape,
                     f"{where}: {name}.{leaf} was loaded as {value.dtype} {list(value.shape)} on {value.device}, "
                     f"stored as {info.dtype} {list(info.shape)}")
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    _require(not left, f"{where} is missing tensors of the model: {', '.join(left[:5])}")


def _source_files(checked: _Checked):
    """(tokenizer, extra files) of the checkpoint a model was loaded from, to save along with it: none, with a
    warning, when that checkpoint is gone or was changed since."""
    import warnings

    from transformers import AutoTokenizer

    path, manifest = checked.path, checked.manifest
    files = manifest.get("files", {})
    extra = {name: record for name, record in manifest.get("extra_files", {}).items() if name != CARD}
    try:
        _check_files(path, {**files, **extra}, "a file")
        tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
        return tokenizer, {name: (path / name).read_text() for name in extra}
    except (SensiquantError, OSError, ValueError) as exc:
        warnings.warn(f"saving without the tokenizer and extra files of {path}: {exc}", stacklevel=3)
        return None, {}


def _save_pretrained(model, save_directory, is_main_process: bool = True, state_dict=None, push_to_hub: bool = False,
                     variant=None, **kwargs) -> None:
    """``save_pretrained`` of a model loaded from a sensiquant checkpoint: a sensiquant checkpoint again
    (:func:`save_quantized`: same config, model card and extra files, and the tokenizer of the checkpoint it was
    loaded from while that is unchanged). Other keyword arguments of transformers' save_pretrained (shard size,
    safe_serialization, ...) do not change what is written."""
    if state_dict is not None or push_to_hub or variant is not None:
        raise SensiquantError("save_pretrained of a sensiquant model writes a whole sensiquant checkpoint: "
                              "state_dict, push_to_hub and variant are not supported")
    if not is_main_process:
        return
    source = model.sensiquant_source
    tokenizer, extra = _source_files(source)
    save_quantized(model, tokenizer, save_directory, QuantConfig.from_dict(source.manifest["config"]),
                   model.sensiquant_report, extra_files=extra, card=source.manifest.get("card"))


def _finish_loaded(model: nn.Module, checked: _Checked) -> None:
    """What every model loaded from a checkpoint carries: ``sensiquant_report`` (the manifest's record),
    ``sensiquant_source`` (what was checked), and a ``save_pretrained`` that writes a sensiquant checkpoint (the
    one transformers has would write packed tensors without a manifest, which nothing loads)."""
    import types

    model.sensiquant_report = _manifest_report(checked)
    model.sensiquant_source = checked
    model.save_pretrained = types.MethodType(_save_pretrained, model)


def load_quantized(path: str | Path, trust_remote_code: bool = False, verify: bool = False):
    """(model, tokenizer) from a checkpoint directory, QuantLinear layers restored from their stored tensors.

    The checkpoint is checked first (see the module docstring); ``verify=True`` also hashes the weights."""
    from transformers import AutoTokenizer

    path = Path(path)
    checked = _inspect(path)
    if verify:
        _check_weights_hash(checked)
    model = _empty_model(path, trust_remote_code)
    state = _install_quant_linears(model, checked)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    _require(not unexpected, f"checkpoint has tensors the model does not: {unexpected[:5]}")
    model.tie_weights()
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    _require(not left, f"{path / WEIGHTS} is missing tensors of the model: {', '.join(left[:5])}")
    model.eval()
    tokenizer = None
    if (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as exc:
            raise SensiquantError(f"cannot load the tokenizer of {path}: {str(exc).strip().splitlines()[0]}") \
                from None
    _finish_loaded(model, checked)
    return model, tokenizer
