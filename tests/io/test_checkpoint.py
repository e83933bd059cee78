import torch
from safetensors.torch import load_file, save_file

from sensiquant.io import mmap_safetensors


def test_mmap_safetensors_equals_load_file(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).half(), "c": torch.randint(0, 255, (11,), dtype=torch.uint8),
               "d": torch.randint(-3000, 3000, (4, 2), dtype=torch.int16), "e": torch.randn(2, 2).bfloat16(),
               "empty": torch.zeros(0, dtype=torch.float16)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    mapped, loaded = mmap_safetensors(path), load_file(str(path))
    assert set(mapped) == set(loaded)
    for name, value in loaded.items():
        assert mapped[name].dtype == value.dtype and mapped[name].shape == value.shape
        assert torch.equal(mapped[name], value), name
    mapped["a"].mul_(0)  # private copy-on-write map: the file is not changed
    assert torch.equal(load_file(str(path))["a"], tensors["a"])
