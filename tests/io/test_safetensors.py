"""The safetensors reader: equal to the library on good files, one SensiquantError on every malformed one."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensiquant import SensiquantError
from sensiquant.io import mmap_safetensors, read_safetensors_header
from sensiquant.io.safetensors import MAX_HEADER_BYTES, write_safetensors


def test_mmap_safetensors_equals_load_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randint(0, 255, (11,), dtype=torch.uint8),
               "d": torch.randint(-3000, 3000, (4, 2), dtype=torch.int16), "e": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, dtype=torch.float16), "scalar": torch.tensor(2.5)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"producer": "test"})
    mapped, loaded = mmap_safetensors(path), load_file(str(path))
    assert set(mapped) == set(loaded)
    for name, value in loaded.items():
        assert mapped[name].dtype == value.dtype and mapped[name].shape == value.shape
        assert torch.equal(mapped[name], value), name
    mapped["a"].mul_(0)  # private copy-on-write map: the file is not changed
    assert torch.equal(load_file(str(path))["a"], tensors["a"])
    header = read_safetensors_header(path)
    assert header.metadata == {"producer": "test"} and header.tensors["a"].shape == (3, 5)
    assert header.file_size == path.stat().st_size


def _file(tmp_path, header: dict | bytes, body: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return path


F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, body, length, needle", [
    (b"", b"", None, "the header is not valid JSON"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    (b'{"a": 1', b"", None, "not valid JSON"),
    (b'{"\xff": 1}', b"", None, "not valid UTF-8"),
    (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": {}}', bytes(4), None, "duplicate key"),
    ({"a": F32_2x2}, bytes(16), 2**63, "exceeds the limit"),
    ({"a": F32_2x2}, bytes(16), MAX_HEADER_BYTES + 1, "exceeds the limit"),
    ({"a": F32_2x2}, bytes(16), 10**6, "runs past the end of the file"),
    ({"a": {**F32_2x2, "dtype": "Q4"}}, bytes(16), None, "unsupported dtype"),
    ({"a": {**F32_2x2, "shape": [2, -2]}}, bytes(16), None, "not a list of non-negative integers"),
    ({"a": {**F32_2x2, "shape": [2.0, 2]}}, bytes(16), None, "not a list of non-negative integers"),
    ({"a": {**F32_2x2, "shape": "4"}}, bytes(16), None, "not a list of non-negative integers"),
    ({"a": {**F32_2x2, "data_offsets": [0]}}, bytes(16), None, "are not two integers"),
    ({"a": {**F32_2x2, "data_offsets": [0, 17]}}, bytes(16), None, "outside the data section"),
    ({"a": {**F32_2x2, "data_offsets": [-4, 12]}}, bytes(16), None, "outside the data section"),
    ({"a": {**F32_2x2, "data_offsets": [8, 4]}}, bytes(16), None, "outside the data section"),
    ({"a": {**F32_2x2, "data_offsets": [0, 2**62]}}, bytes(16), None, "outside the data section"),
    ({"a": {**F32_2x2, "data_offsets": [0, 12]}}, bytes(16), None, "needs 16"),
    ({"a": F32_2x2, "b": F32_2x2}, bytes(32), None, "overlaps"),
    ({"a": {**F32_2x2, "data_offsets": [16, 32]}}, bytes(32), None, "leaves a gap"),
    ({"a": F32_2x2}, bytes(20), None, "trailing bytes"),
    ({"a": F32_2x2, "__metadata__": {"x": 1}}, bytes(16), None, "__metadata__"),
    ({"a": [1]}, bytes(16), None, "not a JSON object"),
])
def test_malformed_headers_are_one_clear_error(tmp_path, header, body, length, needle):
    path = _file(tmp_path, header, body, length)
    for read in (read_safetensors_header, mmap_safetensors):
        with pytest.raises(SensiquantError, match=needle) as info:
            read(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_files_shorter_than_the_length_prefix(tmp_path, size):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01" * size)
    with pytest.raises(SensiquantError, match="shorter than its 8-byte header length"):
        mmap_safetensors(path)


def test_truncated_anywhere_is_an_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(4, 4), "b": torch.randn(3).half()}, str(path))
    data = path.read_bytes()
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(SensiquantError):
            mmap_safetensors(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(SensiquantError, match="not found"):
        mmap_safetensors(tmp_path / "nothing.safetensors")
    with pytest.raises(SensiquantError, match="cannot read"):
        mmap_safetensors(tmp_path)


def test_write_safetensors_is_the_same_bytes_every_time_and_reads_everywhere(tmp_path):
    tensors = {"b": torch.randn(3, 5).bfloat16(), "a": torch.arange(7, dtype=torch.int8), "s": torch.tensor(2.5),
               "e": torch.zeros(0, 4), "m": torch.ones(2, dtype=torch.bool), "h": torch.randn(4, 2).half().t()}
    write_safetensors(tensors, tmp_path / "x.safetensors", {"z": "1", "a": "2"})
    write_safetensors(dict(reversed(tensors.items())), tmp_path / "y.safetensors", {"a": "2", "z": "1"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    theirs, ours = load_file(tmp_path / "x.safetensors"), mmap_safetensors(tmp_path / "x.safetensors")
    for name, value in tensors.items():
        assert torch.equal(theirs[name], value) and torch.equal(ours[name], value)
    header = read_safetensors_header(tmp_path / "x.safetensors")
    assert header.metadata == {"a": "2", "z": "1"}
