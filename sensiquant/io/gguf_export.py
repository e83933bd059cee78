"""A sensiquant checkpoint as a GGUF file for llama.cpp (``sensiquant export gguf``).

Layers quantized on a GGUF grid (``LayerSpec.gguf``, ``format/ggml.py``) already store llama.cpp's block bytes: they
are written as they are. Other quantized layers need ``fallback``, a GGUF type their dequantized weights are rounded
onto (a second rounding: it costs accuracy, and the summary says which layers took it). Embeddings and the head are
written in ``embed_type``, vectors (norms, biases) in F32.

The architecture's metadata and the tokenizer come from the GGUF the model was converted from (the checkpoint's
``base_model`` when that resolves to a .gguf file, or ``base=``): its key-values are copied, its tensor list is the
list to write, and every one of its tensors must have a source in the checkpoint. Hugging Face names map to GGUF
names with the ``gguf`` package's tensor map; LLaMA's q/k rows are permuted back to llama.cpp's rotary layout
(transformers undoes that permutation when it loads a GGUF). The file is written whole or not at all."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import SensiquantError
from ..format import ggml
from ..format.spec import LayerSpec
from ..methods.round import quantize_weight
from ..runtime.qlinear import QuantLinear
from ..serialize import atomic_file

PLAIN_TYPES = ("F32", "F16", "BF16")
_PERMUTED_ARCHS = ("llama",)  # archs whose q/k rows llama.cpp's converter permutes (and transformers unpermutes)
_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
               "Q8_0": "MOSTLY_Q8_0", "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M",
               "Q5_K": "MOSTLY_Q5_K_M", "Q6_K": "MOSTLY_Q6_K"}


def _check_type(name: str | None, what: str, plain: bool = False) -> None:
    if name is None:
        return
    if name in ggml.TYPES or (plain and name in PLAIN_TYPES):
        return
    choices = [*PLAIN_TYPES, *ggml.TYPES] if plain else list(ggml.TYPES)
    raise SensiquantError(f"unknown {what} {name!r}: choose one of {', '.join(choices)}")


def _permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary row order for LLaMA q/k projections (rows = heads x 2 halves x dim)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _requantize(w: torch.Tensor, name: str) -> tuple[np.ndarray, str]:
    """``w`` (out, in) rounded onto GGUF type ``name`` (or its fallback for these rows) with the searched grid."""
    kind = ggml.fit_type(name, w.shape[1])
    qweight = quantize_weight(w, LayerSpec(gguf=kind))
    return qweight.to_tensors()["qweight"].reshape(w.shape[0], -1).numpy(), kind


def _plain(w: torch.Tensor, name: str) -> tuple[np.ndarray, str]:
    if name == "BF16":
        return w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1), name
    return w.to(torch.float16 if name == "F16" else torch.float32).numpy(), name


def _base_gguf(checkpoint: Path, base) -> Path:
    if base is None:
        from .checkpoint import read_manifest
        from .models import resolve_model

        name = read_manifest(checkpoint).get("card", {}).get("base_model")
        if name is None:
            raise SensiquantError(f"{checkpoint} does not name its base model: give the model's GGUF with --base")
        base = resolve_model(name)
    path = Path(base)
    if path.suffix != ".gguf" or not path.is_file():
        raise SensiquantError(f"export needs the GGUF the model came from, for its tokenizer and metadata; {base} "
                              "is not a .gguf file (give one with --base)")
    return path


def export_gguf(checkpoint: str | Path, out: str | Path, base: str | Path | None = None,
                fallback: str | None = None, embed_type: str = "F16", progress: bool = True) -> dict:
    """Write the checkpoint at ``checkpoint`` as the GGUF file ``out``; returns what was written (types, sizes)."""
    import gguf
    from tqdm.auto import tqdm

    from .checkpoint import load_quantized

    start = time.perf_counter()
    _check_type(fallback, "fallback type")
    _check_type(embed_type, "embedding type", plain=True)
    checkpoint, out = Path(checkpoint), Path(out)
    base_path = _base_gguf(checkpoint, base)
    model, _ = load_quantized(checkpoint)
    reader = gguf.GGUFReader(str(base_path))
    arch = str(reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    arch_ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arch_ids:
        raise SensiquantError(f"{base_path}: architecture {arch!r} is not known to the gguf package")
    config = model.config
    n_blocks = config.num_hidden_layers
    names = gguf.get_tensor_name_map(arch_ids[arch], n_blocks)
    wanted = {t.name: t for t in reader.tensors}

    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    sources: dict[str, tuple[str, object]] = {}  # gguf name -> (hf name, QuantLinear | tensor)
    for hf_name, module in quantized.items():
        sources[_gguf_name(names, hf_name + ".weight")] = (hf_name, module)
    for hf_name, param in model.named_parameters():
        if hf_name.rpartition(".")[0] in quantized and hf_name.endswith(".weight"):
            continue
        target = _gguf_name(names, hf_name)
        if target is not None and target in wanted and target not in sources:
            sources[target] = (hf_name, param)
    missing = [n for n in wanted if n not in sources]
    if missing:
        raise SensiquantError(f"{base_path} has tensors the checkpoint cannot fill: {', '.join(missing[:5])}")
    not_gguf = [n for n, m in quantized.items() if m.spec.gguf is None]
    if not_gguf and fallback is None:
        spec = quantized[not_gguf[0]].spec
        raise SensiquantError(f"{len(not_gguf)} layers are not on a GGUF grid (e.g. {not_gguf[0]}: {spec.bits}-bit, "
                              f"group size {spec.group_size}): quantize with --gguf TYPE, or give --fallback TYPE to "
                              "round their weights onto a GGUF type")

    n_head, n_kv = config.num_attention_heads, getattr(config, "num_key_value_heads", config.num_attention_heads)
    types, linear_bits, linear_params, requantized = Counter(), 0, 0, []
    tensors = {}
    for target in tqdm(list(wanted), desc="gguf", disable=not progress):
        hf_name, src = sources[target]
        if isinstance(src, QuantLinear):
            if src.spec.gguf is not None:
                kind = src.spec.gguf
                data = src.stored_tensors()["qweight"].reshape(src.out_features, -1).cpu().numpy()
            else:
                data, kind = _requantize(src.dequantize().cpu(), fallback)
                requantized.append(hf_name)
            linear_bits += data.size * 8
            linear_params += src.out_features * src.in_features
        else:
            w = src.detach().float().cpu()
            data, kind = _plain(w, "F32") if w.dim() == 1 else (
                _plain(w, embed_type) if embed_type in PLAIN_TYPES else _requantize(w, embed_type))
        if arch in _PERMUTED_ARCHS and (".attn_q." in target or ".attn_k." in target):
            data = _permute_rows(data, n_head if ".attn_q." in target else n_kv)
        types[kind] += 1
        tensors[target] = (np.ascontiguousarray(data), kind)

    linear_types = Counter()
    for module in quantized.values():
        kind = module.spec.gguf or ggml.fit_type(fallback, module.in_features)
        linear_types[kind] += module.out_features * module.in_features
    main_type = linear_types.most_common(1)[0][0] if linear_types else None
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for field in reader.fields.values():
            if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT,
                              gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION) or \
                    field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub_type)
        if main_type is not None:
            writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[main_type])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_string("general.quantized_by", "sensiquant")
        for target, (data, kind) in tensors.items():
            writer.add_tensor(target, data, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"out": str(out), "base": str(base_path), "bytes": out.stat().st_size,
            "linear_bits_per_param": linear_bits / linear_params if linear_params else None,
            "tensor_types": dict(types), "linear_params_by_type": dict(linear_types),
            "requantized_layers": len(requantized), "seconds": time.perf_counter() - start}


def _gguf_name(names, hf_name: str) -> str | None:
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
