"""Reading safetensors files, validated, as zero-copy views of a private memory map.

The header is checked before anything is mapped (as the safetensors library does): an 8-byte little-endian length
that fits the file and at most :data:`MAX_HEADER_BYTES`, a UTF-8 JSON object without duplicate keys, and for every
tensor a known dtype, a shape of non-negative integers and ``data_offsets`` [begin, end] with
``end - begin == prod(shape) * itemsize``; the tensors tile the data section exactly (no gap, no overlap, nothing
after the last one), so a truncated or extended file is an error too. Every problem is one :class:`SensiquantError`
naming the file (and the tensor).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import SensiquantError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library allows 100 MB

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("F8_E4M3", "float8_e4m3fn"),
                     ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (``"F16"``)."""
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float16`` -> ``"F16"``)."""
    return DTYPE_NAMES[dtype]


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: dtype name, shape, byte range within the data section."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """The validated header of a safetensors file."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int  # file offset of the data section (8 + header length)
    file_size: int


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(text: str | bytes, what: str):
    """JSON from ``text``, duplicate keys refused; one SensiquantError naming ``what`` for anything malformed."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise SensiquantError(f"{what} is not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise SensiquantError(f"{what} is not valid JSON: {exc}") from None
    except _DuplicateKey as exc:
        raise SensiquantError(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        raise SensiquantError(f"{what} is not valid JSON: nested too deeply") from None


def read_json_file(path: str | Path):
    """A JSON file's content; one SensiquantError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SensiquantError(f"cannot read {path}: {exc.strerror}") from None
    return parse_json(raw, str(path))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_header(f, path: Path) -> SafetensorsHeader:
    size = os.fstat(f.fileno()).st_size
    if size < 8:
        raise SensiquantError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    (header_len,) = struct.unpack("<Q", f.read(8))
    if header_len > MAX_HEADER_BYTES:
        raise SensiquantError(f"{path}: header length {header_len} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if header_len > size - 8:
        raise SensiquantError(f"{path}: header length {header_len} runs past the end of the file ({size} bytes); "
                              "the file is truncated or not a safetensors file")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise SensiquantError(f"{path}: the file shrank while it was read")
    header = parse_json(raw, f"{path}: the header")
    if not isinstance(header, dict):
        raise SensiquantError(f"{path}: the header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SensiquantError(f"{path}: __metadata__ must be an object of strings")
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict):
            raise SensiquantError(f"{where}: its entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise SensiquantError(f"{where} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SensiquantError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise SensiquantError(f"{where}: data_offsets {offsets!r} are not two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise SensiquantError(f"{where}: data_offsets [{begin}, {end}] lie outside the data section "
                                  f"({data_size} bytes); the file is truncated or corrupt")
        expected = math.prod(shape) * _DTYPES[dtype].itemsize
        if end - begin != expected:
            raise SensiquantError(f"{where}: {end - begin} bytes stored, but {dtype} x {shape} needs {expected}")
        tensors[name] = TensorInfo(dtype, tuple(shape), begin, end)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            problem = "overlaps the tensor before it" if info.begin < position else f"leaves a gap at byte {position}"
            raise SensiquantError(f"{path}: tensor {name!r} at [{info.begin}, {info.end}] {problem}")
        position = info.end
    if position != data_size:
        raise SensiquantError(f"{path}: the tensors end at byte {position} of a {data_size}-byte data section "
                              "(trailing bytes)")
    return SafetensorsHeader(path, tensors, metadata, data_start, size)


def _open(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise SensiquantError(f"{path} not found") from None
    except OSError as exc:
        raise SensiquantError(f"cannot read {path}: {exc.strerror}") from None


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """The validated header of a safetensors file (nothing of the data is read)."""
    path = Path(path)
    with _open(path) as f:
        return _parse_header(f, path)


def read_safetensors_names(path: str | Path) -> list[str]:
    """Only the tensor names of a safetensors file: the header is bounded and must be a JSON object, nothing else
    is checked (for telling what a directory holds without judging files that other tools wrote)."""
    path = Path(path)
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 <= header_len <= min(size - 8, MAX_HEADER_BYTES):
            raise SensiquantError(f"{path}: not a safetensors file (bad header length)")
        header = parse_json(f.read(header_len), f"{path}: the header")
    if not isinstance(header, dict):
        raise SensiquantError(f"{path}: the header is not a JSON object")
    return [name for name in header if name != "__metadata__"]


def mmap_safetensors(path: str | Path, header: SafetensorsHeader | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a zero-copy view of a private memory map: nothing is read until it is
    touched, and pages never touched never count towards resident memory. ``header``, when given, is the one read
    earlier (by :func:`read_safetensors_header`); the file must still be the one it describes."""
    path = Path(path)
    with _open(path) as f:
        current = _parse_header(f, path)
        if header is not None and (current.tensors != header.tensors or current.file_size != header.file_size):
            raise SensiquantError(f"{path} changed while it was being loaded")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: writable views, file untouched
    out = {}
    for name, info in current.tensors.items():
        dtype = _DTYPES[info.dtype]
        count = info.nbytes // dtype.itemsize
        flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=current.data_start + info.begin) if count \
            else torch.empty(0, dtype=dtype)
        out[name] = flat.view(info.shape)
    return out


def read_tensors(path: str | Path, names: list[str], header: SafetensorsHeader | None = None
                 ) -> dict[str, torch.Tensor]:
    """Fresh tensors of the named entries of a safetensors file, read with plain reads (no memory map, so nothing
    of the file stays resident once the tensors are freed). ``header`` as in :func:`mmap_safetensors`."""
    path = Path(path)
    out = {}
    with _open(path) as f:
        current = _parse_header(f, path)
        if header is not None and (current.tensors != header.tensors or current.file_size != header.file_size):
            raise SensiquantError(f"{path} changed while it was being loaded")
        for name in names:
            info = current.tensors.get(name)
            if info is None:
                raise SensiquantError(f"{path}: no tensor {name}")
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
            f.seek(current.data_start + info.begin)
            if info.nbytes and f.readinto(memoryview(raw.numpy())) != info.nbytes:
                raise SensiquantError(f"{path}: the file shrank while it was read")
            out[name] = raw.view(_DTYPES[info.dtype]).view(info.shape) if info.nbytes else \
                torch.empty(info.shape, dtype=_DTYPES[info.dtype])
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` as a safetensors file, byte for byte the same for the same tensors and metadata: the
    header JSON has sorted keys and the data follow in name order (the safetensors library writes its metadata
    in hash-map order, which differs from one process to the next)."""
    names = sorted(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    flat = {}
    for name in names:
        t = tensors[name].detach().contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        flat[name] = data
        header[name] = {"dtype": dtype_name(t.dtype), "shape": list(t.shape),
                        "data_offsets": [offset, offset + data.numel()]}
        offset += data.numel()
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned, as the library writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            f.write(memoryview(flat[name].numpy()))
