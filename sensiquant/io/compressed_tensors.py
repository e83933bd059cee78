"""A sensiquant checkpoint as a compressed-tensors checkpoint (``sensiquant export compressed-tensors``), the format
vLLM and transformers' compressed-tensors integration load.

Every quantized layer maps exactly, from its stored codes, onto compressed-tensors' ``pack-quantized`` format:
integer weights of 2, 3, 4 or 8 bits, asymmetric, ``group`` strategy with the layer's group size (``channel`` for
per-channel layers). compressed-tensors stores signed codes and zero points, ``W = (q_s - z_s) * scale`` with
``q_s = q - 2**(bits-1)`` and ``z_s = zero - 2**(bits-1)``, so our ``(q - zero) * scale`` is the same number for
every weight. The tensors, per layer, as compressed-tensors' own compressor writes them:

    weight_packed       int32 (out, ceil(in * bits / 32)): the signed codes, packed by compressed-tensors'
                        ``pack_to_int32`` (dense along the input dimension)
    weight_scale        float32 (out, n_groups): our FP16 scales, widened (exact; transformers dequantizes in the
                        scale's dtype, so FP16 here would round every product)
    weight_zero_point   int32 (ceil(out * bits / 32), n_groups): the signed integer zero points, packed along
                        the output dimension (``pack_to_int32(..., packed_dim=0)``)
    weight_shape        int64 (2,): [out, in]

Layers whose stored grid compressed-tensors cannot hold are refused, the first one named, before anything is
written: outliers, 8-bit metadata (``quant_meta``), fractional zero points (HQQ's fractional candidate), zero
points outside the code range, GGUF block types, a group size that does not divide the input columns. Layers
with different (bits, group size) become separate config groups whose targets are the layers' names; the linears
left in full precision (the head) are the ignore list. Everything else (embeddings, norms, head, biases) is
written as it is stored.

``config.json`` carries the ``quantization_config`` as compressed-tensors writes it (``ModelCompressor
.update_config``: its ``QuantizationConfig`` dumped, plus version, sparsity and transform configs). With one config
group it also says ``"dequantize": true``: transformers (5.24) then builds the dense weights at load time through
compressed-tensors' own decompressor, exactly; its default, compressed route cannot load asymmetric
``pack-quantized`` weights with compressed-tensors 0.18 to 0.20.1 (the layers it prepares on the meta device expect
unpacked zero points: a size mismatch). Its dequantizing route applies the first group's scheme to every layer, so
checkpoints with several groups leave the key out: transformers loads them through the compressed route with
compressed-tensors up to 0.17.1, not with 0.18 to 0.20.1. vLLM and compressed-tensors ignore the key and read each
layer's group. The directory is written whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import SensiquantError
from ..runtime.qlinear import QuantLinear
from ..runtime.walk import unique_state
from .atomic import make_parent, replacing_directory
from .safetensors import read_json_file, read_safetensors_header, write_safetensors

FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
EXPORT_KEY = "sensiquant_export"  # in the safetensors metadata: marks a directory this export may replace
EXPORT_VALUE = "compressed-tensors"
_SENSIQUANT_FILES = ("sensiquant.json", WEIGHTS, CONFIG)


def _import_compressed_tensors():
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as exc:
        raise SensiquantError(f"the compressed-tensors export needs the compressed-tensors package ({exc}): "
                              "pip install 'sensiquant[export]'") from None
    return compressed_tensors, PackedQuantizationCompressor, pack_to_int32, QuantizationArgs, QuantizationConfig, \
        QuantizationScheme


def _check_replaceable(out: Path, checkpoint: Path) -> None:
    if out == checkpoint or checkpoint in out.parents:
        raise SensiquantError(f"cannot write the compressed-tensors checkpoint to {out}: it is (inside) the "
                              "checkpoint being exported")
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise SensiquantError(f"cannot write the compressed-tensors checkpoint to {out}: it is a file, not a "
                              "directory")
    try:
        entries = os.listdir(out)
    except OSError as exc:
        raise SensiquantError(f"cannot read {out}: {exc.strerror}") from None
    if not entries:
        return
    previous = False
    if (out / WEIGHTS).is_file() and (out / CONFIG).is_file():
        try:
            previous = read_safetensors_header(out / WEIGHTS).metadata.get(EXPORT_KEY) == EXPORT_VALUE
        except SensiquantError:
            previous = False
    if not previous:
        raise SensiquantError(f"refusing to replace {out}: it is not empty and not a compressed-tensors export of "
                              "sensiquant")


def _refusal(module: QuantLinear) -> str | None:
    """Why the layer's stored form has no exact compressed-tensors equivalent (spec-level reasons), or None."""
    spec = module.spec
    if spec.gguf is not None:
        return (f"is stored as the GGUF block type {spec.gguf}, which compressed-tensors has no format for "
                "(export it with `sensiquant export gguf`)")
    if module.n_outliers:
        return f"keeps {module.n_outliers} outliers, which compressed-tensors cannot store"
    if spec.quant_meta:
        return ("stores its scales and zeros as 8-bit codes (quant_meta), which compressed-tensors cannot store (it "
                "keeps one floating-point scale per group)")
    if spec.group_size is not None and module.in_features % spec.group_size:
        return (f"has groups of {spec.group_size} that do not divide its {module.in_features} input columns "
                "(compressed-tensors groups must tile the rows)")
    return None


def _zero_refusal(zero: torch.Tensor, bits: int) -> str | None:
    fractional = zero != torch.round(zero)
    if bool(fractional.any()):
        value = float(zero[fractional][0])
        return (f"has fractional zero points (e.g. {value:g}), compressed-tensors stores integer ones: quantize with "
                "integer zeros (--method rtn, --grid rtn, or HQQParams(fractional_candidate=False))")
    qmax = 2**bits - 1
    outside = (zero < 0) | (zero > qmax)
    if bool(outside.any()):
        return (f"has a zero point ({float(zero[outside][0]):g}) outside the {bits}-bit code range [0, {qmax}], "
                "which compressed-tensors cannot store")
    return None


def _scheme_key(module: QuantLinear) -> tuple[int, int | None]:
    return module.spec.bits, module.spec.group_size


def export_compressed_tensors(checkpoint: str | Path, out_dir: str | Path, progress: bool = True,
                              trust_remote_code: bool = False) -> dict:
    """Write the checkpoint at ``checkpoint`` as a compressed-tensors ``pack-quantized`` checkpoint in ``out_dir``
    (new, empty, or a previous export, which is replaced); returns what was written: layers, bits per layer,
    config groups, ``bytes`` (of the weights file), linear bits per parameter, seconds."""
    from tqdm.auto import tqdm

    from .checkpoint import load_quantized

    ct, compressor, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = \
        _import_compressed_tensors()
    start = time.perf_counter()
    checkpoint = Path(os.path.realpath(os.fspath(checkpoint)))
    out = Path(os.path.realpath(os.fspath(out_dir)))
    _check_replaceable(out, checkpoint)
    model, tokenizer = load_quantized(checkpoint, trust_remote_code=trust_remote_code)
    manifest = model.sensiquant_source.manifest  # checked by load_quantized, its files' sha256 included
    quantized = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not quantized:
        raise SensiquantError(f"cannot export {checkpoint} to compressed-tensors: it has no quantized layers")
    where = f"cannot export {checkpoint} to compressed-tensors: layer"
    schemes: dict[tuple[int, int | None], object] = {}
    for module in quantized.values():
        key = _scheme_key(module)
        if key not in schemes:
            bits, group_size = key
            schemes[key] = QuantizationArgs(num_bits=bits, type="int", symmetric=False, dynamic=False,
                                            strategy="channel" if group_size is None else "group",
                                            group_size=group_size)

    tensors: dict[str, torch.Tensor] = {}
    layer_bits, linear_bits, linear_params = {}, 0, 0
    for name, module in tqdm(list(quantized.items()), desc="compressed-tensors", disable=not progress):
        reason = _refusal(module)
        qw = None if reason else module.quantized_weight()
        bits = module.spec.bits
        reason = reason or _zero_refusal(qw.zero, bits)
        if reason:  # nothing is written yet
            raise SensiquantError(f"{where} {name} {reason}")
        offset = 1 << (bits - 1)  # compressed-tensors' signed codes: q - 2**(bits-1), zero likewise
        codes = (qw.codes.to(torch.int16) - offset).to(torch.int8)
        zero = (qw.zero.to(torch.int16) - offset).to(torch.int8)
        state = {"weight_packed": pack_to_int32(codes, bits),
                 "weight_scale": qw.scale.to(torch.float32).contiguous(),
                 "weight_zero_point": pack_to_int32(zero, bits, packed_dim=0),
                 "weight_shape": torch.tensor(qw.shape, dtype=torch.int64)}
        # compressed-tensors' own reader must give back our weights, bit for bit
        scheme = QuantizationScheme(targets=[name], weights=schemes[_scheme_key(module)], format=FORMAT)
        dense = compressor.decompress(dict(state), scheme)["weight"]
        if dense.dtype != torch.float32 or not torch.equal(dense, qw.grid()):
            raise SensiquantError(f"{where} {name}: compressed-tensors {ct.__version__} reads its packed tensors back "
                                  "as other weights (a packing this export does not know)")
        for leaf, value in state.items():
            tensors[f"{name}.{leaf}"] = value
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach()
        layer_bits[name] = bits
        linear_bits += sum(v.numel() * v.element_size() * 8 for k, v in state.items() if k != "weight_shape")
        linear_params += module.out_features * module.in_features
    for key, value in unique_state(model).items():
        if key.rpartition(".")[0] not in quantized:
            tensors[key] = value.detach()

    groups = {}
    for index, (key, args) in enumerate(schemes.items()):
        targets = [name for name, module in quantized.items() if _scheme_key(module) == key]
        groups[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format=FORMAT)
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    qconfig = QuantizationConfig(config_groups=groups, format=FORMAT, quantization_status="compressed",
                                 ignore=ignore)
    quantization_config = {  # as compressed-tensors' ModelCompressor.update_config writes it
        "version": ct.__version__, "quant_method": "compressed-tensors", "sparsity_config": {},
        "transform_config": {}, **qconfig.model_dump(mode="json", exclude=["quant_method"]),
    }
    if len(groups) == 1:
        quantization_config["dequantize"] = True  # transformers: the dense weights at load (module docstring)
    hf_config = read_json_file(checkpoint / CONFIG)
    hf_config.pop("transformers_weights", None)  # sensiquant's guard against plain loading
    hf_config["quantization_config"] = quantization_config
    copied = sorted(name for name in manifest.get("files", {}) if name not in _SENSIQUANT_FILES)
    metadata = {"format": "pt", "producer": "sensiquant", EXPORT_KEY: EXPORT_VALUE,
                "compressed_tensors_version": ct.__version__}

    make_parent(out, "the compressed-tensors checkpoint")
    try:
        with replacing_directory(out) as tmp:
            (tmp / CONFIG).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
            if copied:  # the tokenizer (and any model code) exactly as the checkpoint holds it, checked on load
                for name in copied:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(checkpoint / name, tmp / name)
            elif tokenizer is not None:  # format-1 checkpoints list no files
                tokenizer.save_pretrained(tmp)
            write_safetensors(tensors, tmp / WEIGHTS, metadata)
    except OSError as exc:
        raise SensiquantError(f"could not write the compressed-tensors checkpoint {out}: "
                              f"{exc.strerror or exc}") from None
    return {"out": str(out), "format": FORMAT, "compressed_tensors_version": ct.__version__,
            "layers": len(quantized), "layer_bits": layer_bits,
            "config_groups": {g: {"bits": bits, "group_size": group_size, "layers": len(groups[g].targets)}
                              for g, (bits, group_size) in zip(groups, schemes)},
            "ignored": ignore, "bytes": (out / WEIGHTS).stat().st_size,
            "linear_bits_per_param": linear_bits / linear_params,
            "seconds": time.perf_counter() - start}
