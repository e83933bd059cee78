"""Models larger than memory: a skeleton without block weights, and each decoder block's weights read from disk
only while it is worked on.

:func:`open_streamed` builds the model from its config with every parameter on the meta device (buffers such as
rotary frequencies are real), loads the parameters outside the decoder blocks (embeddings, final norm, head), and
returns a :class:`StreamedModel` whose :meth:`~StreamedModel.block` context loads one block's weights (fp32) and
drops them again. Weights are read from safetensors files (one file or shards with an index) with plain reads, so
nothing read for one block stays resident. A GGUF
file is first converted once, tensor by tensor, into the same cache folder :func:`~.models.load_model` uses
(:func:`convert_gguf_streamed`), so that no step ever holds the whole fp32 model.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import SensiquantError
from .safetensors import read_json_file, read_safetensors_header, read_tensors

_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
# GGUF tensor processors of transformers that only rename or permute (the shape stays): streamed conversion is
# exact for these architectures; others (MoE expert splits, ...) are refused
_SHAPE_KEEPING = ("TensorProcessor", "LlamaTensorProcessor")
_ROWS_PER_SLICE = 1 << 24  # elements dequantized at a time (64 MB in fp32) when converting a large matrix


class TensorSource:
    """The tensors of a model folder's safetensors weights (``model.safetensors`` or shards with an index), read
    on demand, a few at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / _INDEX
        if index.is_file():
            weight_map = read_json_file(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SensiquantError(f"{index}: no weight_map")
            files = sorted(set(weight_map.values()))
        elif (self.folder / _WEIGHTS).is_file():
            files = [_WEIGHTS]
        else:
            raise SensiquantError(f"{self.folder} has no safetensors weights ({_WEIGHTS} or {_INDEX})")
        self.headers = {f: read_safetensors_header(self.folder / f) for f in files}
        self.file_of = {name: f for f, h in self.headers.items() for name in h.tensors}

    def names(self) -> list[str]:
        return list(self.file_of)

    def fingerprint(self) -> str:
        """A digest of the weight files (names, sizes, times and headers): other weights, another digest."""
        import hashlib

        digest = hashlib.sha256()
        for file, header in sorted(self.headers.items()):
            stat = (self.folder / file).stat()
            digest.update(f"{file}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            digest.update(json.dumps({n: [i.dtype, list(i.shape), i.begin] for n, i in header.tensors.items()},
                                     sort_keys=True).encode())
        return digest.hexdigest()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.headers[self.file_of[name]].tensors[name].shape)

    def read(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Fresh copies (in ``dtype``) of the named tensors, read with plain reads (nothing of the files stays
        resident)."""
        missing = [n for n in names if n not in self.file_of]
        if missing:
            raise SensiquantError(f"{self.folder}: no tensor {missing[0]} in its weights")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.file_of[name], []).append(name)
        for file, wanted in by_file.items():
            for name, value in read_tensors(self.folder / file, wanted, self.headers[file]).items():
                out[name] = value.to(dtype)
        return out


class StreamedModel:
    """A causal LM whose decoder blocks hold their weights only between :meth:`load_block` and :meth:`free_block`
    (or inside :meth:`block`), and whose input embeddings and output head are read only while they are used
    (:meth:`part`): on a 150k-token vocabulary each is about 1 GB in fp32. Blocks marked :meth:`keep` (quantized)
    stay in memory."""

    def __init__(self, model: nn.Module, tokenizer, source: TensorSource, prefix: str, blocks: nn.ModuleList,
                 device: torch.device | None = None):
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.prefix, self.blocks = prefix, blocks
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.resident: set[int] = set()
        base = getattr(model, "base_model", None)
        self.norm = getattr(base, "norm", None)
        self.head = model.get_output_embeddings()
        if self.norm is None or self.head is None:
            raise SensiquantError(f"streaming needs a decoder model with a final norm and an output head "
                                  f"(LLaMA, Qwen2, Mistral, ...); {type(model).__name__} has none")
        if getattr(model.config, "final_logit_softcapping", None):
            raise SensiquantError(f"streaming does not apply {type(model).__name__}'s logit soft-capping yet")
        names = {id(m): n for n, m in model.named_modules()}
        self._parts = {"embed": names[id(model.get_input_embeddings())], "head": names[id(self.head)]}
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.tied = bool(getattr(config, "tie_word_embeddings", False))

    def block_names(self, i: int) -> list[str]:
        """The source names of block ``i``'s parameters."""
        return [f"{self.prefix}.{i}.{n}" for n, _ in self.blocks[i].named_parameters()]

    def load_block(self, i: int) -> nn.Module:
        """Read block ``i``'s weights (fp32) into it; returns the block (a kept block as it is)."""
        if i not in self.resident:
            for name, value in self.source.read(self.block_names(i)).items():
                _assign(self.model, name, value.to(self.device))
        return self.blocks[i]

    def free_block(self, i: int) -> None:
        """Put block ``i``'s plain parameters back on the meta device (a kept block stays)."""
        if i not in self.resident:
            to_meta(self.blocks[i])
        release_freed_memory()

    def keep(self, i: int) -> None:
        """Block ``i`` (now quantized) stays in memory: later loads and frees leave it alone."""
        self.resident.add(i)

    @contextmanager
    def block(self, i: int) -> Iterator[nn.Module]:
        """Block ``i`` with its weights, dropped again on leaving (also on errors)."""
        try:
            yield self.load_block(i)
        finally:
            self.free_block(i)

    def load_part(self, which: str) -> nn.Module:
        """Read the input embeddings (``"embed"``) or the output head (``"head"``) into the model."""
        module = self.model.get_submodule(self._parts[which])
        if module.weight.device.type == "meta":
            source_name = self._parts["embed" if self.tied else which]
            value = self.source.read([f"{source_name}.weight"])[f"{source_name}.weight"].to(self.device)
            _assign(self.model, f"{source_name}.weight", value)
            if self.tied:
                self.model.tie_weights()
        return module

    def free_part(self, which: str) -> None:
        if self.tied:
            to_meta(self.model.get_input_embeddings())
            self.model.tie_weights()
        else:
            to_meta(self.model.get_submodule(self._parts[which]))
        release_freed_memory()

    @contextmanager
    def part(self, which: str) -> Iterator[nn.Module]:
        """The embeddings or the head, read for the time of the ``with`` and dropped after."""
        try:
            yield self.load_part(which)
        finally:
            self.free_part(which)

    def load_all(self) -> nn.Module:
        """The whole model in memory (every block kept, e.g. quantized; embeddings and head read): to save it."""
        self.load_part("embed")
        self.load_part("head")
        return self.model


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# allocations from 32 MB up (embeddings, head, logit chunks) get pages of their own, returned to the OS when freed;
# smaller ones (a window's activations) reuse the heap, which release_freed_memory trims after each block (at 1 MB
# every activation took fresh pages, and the page faults cost about a fifth of a streamed run's time)
_MMAP_THRESHOLD = 32 << 20


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
            _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Hand memory freed by tensors back to the OS (glibc keeps freed heap pages otherwise, so that a block's
    activations would stay resident after it is done); a no-op where there is no glibc."""
    if _libc():
        _LIBC.malloc_trim(0)


def return_large_frees() -> None:
    """Make glibc serve every allocation of 32 MB or more from pages of its own, so that freeing one returns its
    memory at once (by default glibc raises this threshold as large tensors come and go, up to 32 MB on 64-bit, and
    the heap then keeps them); a no-op where there is no glibc."""
    if _libc():
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)


_LIBC = None


def to_meta(module: nn.Module) -> None:
    """Put every plain parameter of ``module`` on the meta device (its memory is freed)."""
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[key] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, key = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = module._parameters.get(key)
    if old is None:
        raise SensiquantError(f"the model has no parameter {name}")
    if tuple(old.shape) != tuple(value.shape):
        raise SensiquantError(f"{name}: the weights hold shape {tuple(value.shape)}, the model expects "
                              f"{tuple(old.shape)}")
    module._parameters[key] = nn.Parameter(value, requires_grad=old.requires_grad)


def streamed_folder(name_or_path: str, trust_remote_code: bool = False, progress: bool = True) -> Path:
    """The local folder of safetensors weights a streamed run reads (a GGUF file is converted into the cache
    once, tensor by tensor)."""
    from .models import _converted, resolve_model

    path = Path(resolve_model(str(name_or_path))).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        folder = _converted(path)
        if folder is None:
            folder = convert_gguf_streamed(path, trust_remote_code, progress)
            if folder is None:
                raise SensiquantError("streaming a GGUF reads its converted copy, and SENSIQUANT_GGUF_CACHE=0 "
                                      "turns the cache off: set it to a folder instead")
        return folder
    if path.is_dir():
        return path
    raise SensiquantError(f"streaming needs a local model: a folder of safetensors weights or a GGUF file, not "
                          f"{name_or_path!r}")


def open_streamed(name_or_path: str, trust_remote_code: bool = False, progress: bool = True,
                  device: torch.device | str | None = None) -> StreamedModel:
    """The streamed form of a local model (see the module docstring); blocks are loaded onto ``device``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..calib.sequential import find_block_list
    from ..calib.streamed import PLAIN_HEAD
    from ..runtime.walk import find_linears
    from .models import refuse_incomplete_checkpoint

    return_large_frees()
    folder = streamed_folder(name_or_path, trust_remote_code, progress)
    refuse_incomplete_checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    if getattr(config, "model_type", None) not in PLAIN_HEAD:  # their logits are head(norm(h)), nothing more
        raise SensiquantError(f"streaming supports the decoders {', '.join(sorted(PLAIN_HEAD))}, not "
                              f"{getattr(config, 'model_type', None)!r}: quantize it in memory (without --stream)")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.eval()
    found = find_block_list(model, list(find_linears(model)))
    if found is None:
        raise SensiquantError(f"streaming needs a model whose layers sit in a list of blocks; "
                              f"{type(model).__name__} has none")
    prefix, blocks = found
    source = TensorSource(folder)
    streamed = StreamedModel(model, tokenizer, source, prefix, blocks, device)
    lazy = {f"{streamed._parts[p]}.weight" for p in ("embed", "head")}
    outside = [n for n, _ in model.named_parameters(remove_duplicate=False)
               if not n.startswith(prefix + ".") and n not in lazy]
    absent = [n for n in [*outside, f"{streamed._parts['embed']}.weight"] + (
        [] if streamed.tied else [f"{streamed._parts['head']}.weight"]) if n not in source.file_of]
    if absent:
        raise SensiquantError(f"{folder}: no tensor {absent[0]} in its weights")
    for name, value in source.read(outside).items():  # the final norm and the like; embeddings and head wait
        _assign(model, name, value.to(streamed.device))
    for module in model.modules():  # the buffers (rotary frequencies) were made on the CPU
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != streamed.device:
                module._buffers[key] = buf.to(streamed.device)
    model.name_or_path = str(name_or_path)
    model.sensiquant_streamed = streamed  # perplexity scores it block by block until it is all in memory
    return streamed


def convert_gguf_streamed(gguf_path: str | os.PathLike, trust_remote_code: bool = False,
                          progress: bool = True) -> Path | None:
    """Write the fp32 transformers form of a GGUF file (the values transformers' own loader makes) into its cache
    folder (:func:`~.models.converted_gguf_dir`), one tensor in memory at a time, whole or not at all; returns the
    folder (None when the cache is turned off)."""
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
    )

    from .models import _CONVERTED, converted_gguf_dir

    gguf_path = Path(gguf_path)
    folder = converted_gguf_dir(gguf_path)
    if folder is None:
        return None
    kwargs = {"gguf_file": gguf_path.name, "trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(gguf_path.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(gguf_path), return_tensors=False)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed.get("config", {}))
    if type(processor).__name__ not in _SHAPE_KEEPING:
        raise SensiquantError(f"streamed conversion of {arch} GGUF files is not supported yet (its tensors are "
                              "split or merged on loading); load the model whole instead")
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    expected = {n: tuple(p.shape) for n, p in skeleton.state_dict().items()}
    tensors = [(t, mapping[t.name]) for t in reader.tensors if t.name in mapping]
    for tensor, name in tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if expected.get(name) != shape:
            raise SensiquantError(f"{gguf_path.name}: tensor {tensor.name} has shape {shape}, the model expects "
                                  f"{expected.get(name)} for {name}")
    tmp = folder.parent / f".{folder.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        tmp.mkdir(parents=True)
        _write_streamed(tmp / _WEIGHTS, tensors, processor, parsed, progress)
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _CONVERTED).write_text(json.dumps({"gguf": str(gguf_path), "streamed": True}) + "\n")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / _CONVERTED).is_file():  # another process put its copy there first: keep that one
                raise
    except OSError as exc:
        raise SensiquantError(f"could not write the converted copy of {gguf_path.name} in {folder.parent}: "
                              f"{exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _write_streamed(path: Path, tensors: list, processor, parsed: dict, progress: bool) -> None:
    """A safetensors file of fp32 tensors whose header is known up front, each tensor dequantized and written in
    turn (names sorted, as :func:`~.safetensors.write_safetensors` orders them)."""
    import numpy as np
    from gguf.quants import dequantize

    ordered = sorted(tensors, key=lambda item: item[1])
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for tensor, name in ordered:
        nbytes = 4 * int(np.prod([int(d) for d in tensor.shape]))
        header[name] = {"dtype": "F32", "shape": [int(d) for d in reversed(tensor.shape)],
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for tensor, name in tqdm(ordered, desc="convert GGUF", disable=not progress):
            shape = header[name]["shape"]
            # GGUF blocks never cross a row: a large matrix is dequantized a slice of rows at a time, unless the
            # processor reorders its rows (LLaMA's q/k)
            step = shape[0] if len(shape) != 2 or ".attn_q." in tensor.name or ".attn_k." in tensor.name \
                else max(1, _ROWS_PER_SLICE // max(shape[1], 1))
            for start in range(0, shape[0] if shape else 1, step):
                part = tensor.data[start:start + step] if len(shape) == 2 else tensor.data
                weights = dequantize(part, tensor.tensor_type)
                weights = processor.process(weights=weights, name=tensor.name, tensor_key_mapping={},
                                            parsed_parameters=parsed).weights
                data = np.ascontiguousarray(weights, dtype=np.float32)
                expected = [min(step, shape[0] - start), *shape[1:]] if len(shape) == 2 else shape
                if list(data.shape) != expected:
                    raise SensiquantError(f"{tensor.name}: dequantized to shape {list(data.shape)}, expected "
                                          f"{expected}")
                f.write(memoryview(data).cast("B"))
        f.flush()
        os.fsync(f.fileno())
