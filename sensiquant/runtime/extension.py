"""The C++ kernels (``csrc/packed_kernels.cpp``): compiled once per kind of CPU into a cache directory and loaded
into the process. ``-O3 -march=native`` first, then portable ``-O3``, both with OpenMP, then serial ``-O3``.

The cache is ``~/.cache/sensiquant/ext`` (``SENSIQUANT_EXT_DIR`` overrides it, ``SENSIQUANT_NO_EXT=1`` disables the
extension). ``SENSIQUANT_EXT_CFLAGS`` adds compiler flags to the native build, for example ``-mno-avx512f`` to
build and measure the AVX2 path on a CPU that has AVX-512. Code is only loaded from a cache that is private to
this user (owned by it, writable by no one else), and a built library only when it matches the record written at
its build (the sources' hash and the library's own sha256); anything else is rebuilt. :func:`build_extension`
does the build ahead of time, e.g. from an install script::

    python -c "from sensiquant.runtime.extension import build_extension; print(build_extension(verbose=True))"
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import threading
import time
from pathlib import Path

import torch

from ..serialize import write_text_atomic

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("packed_kernels.cpp",)
_HEADERS = ("packed_core.h",)  # included by the sources: part of the build's hash
# (variant, compiler flags, linker flags): OpenMP makes at::parallel_for use PyTorch's threads; the last is serial
_FLAG_SETS = (
    ("native", ["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]),
    ("portable", ["-O3", "-fopenmp"], ["-fopenmp"]),
    ("serial", ["-O3"], []),
)
_STALE_LOCK_SECONDS = 300  # a build killed mid-way leaves its lock file behind (builds take ~20 s)
_ext_lock = threading.Lock()
_ext_state: dict = {"tried": False, "info": None, "error": None}
_RECORD = "sensiquant-build.json"


def extension_dir() -> Path:
    return Path(os.environ.get("SENSIQUANT_EXT_DIR", Path.home() / ".cache" / "sensiquant" / "ext"))


def _cpu_tag() -> str:
    """Short hash of the CPU's feature flags: a ``-march=native`` build is only reused on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1((flags or platform.processor() or platform.machine()).encode()).hexdigest()[:10]


def _sources_tag() -> str:
    """Hash of the sources and the torch version: a changed kernel or torch never reuses an old build."""
    digest = hashlib.sha1(torch.__version__.encode())
    for name in _SOURCES + _HEADERS:
        digest.update((_CSRC / name).read_bytes())
    return digest.hexdigest()[:10]


def _private_dir(path: Path) -> Path:
    """``path`` created private to this user (mode 0700); refuses one that another user owns or may write to,
    since code is loaded from it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise RuntimeError(f"extension cache {path} belongs to another user: not loading code from it")
    if st.st_mode & 0o077:
        path.chmod(0o700)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_record(build_dir: Path, name: str, sources: str) -> None:
    """Keep a cached build only when its record names these sources and the library's bytes are the ones built;
    otherwise empty the directory so that the build starts afresh."""
    library = build_dir / f"{name}.so"
    if not library.exists():
        return
    try:
        record = json.loads((build_dir / _RECORD).read_text())
        if record.get("sources") == sources and record.get("library_sha256") == _sha256(library):
            return
    except (OSError, ValueError):
        pass
    shutil.rmtree(build_dir)
    _private_dir(build_dir)


def _write_record(build_dir: Path, library: Path, sources: str) -> None:
    write_text_atomic(build_dir / _RECORD, json.dumps({"sources": sources, "library_sha256": _sha256(library)}))


def _remove_stale_lock(build_dir: Path) -> None:
    """torch's build lock has no owner check: a process killed while building leaves it behind and every later
    build would wait for it forever. Wait for a live build to finish, but not beyond the lock's stale age."""
    lock = build_dir / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:
            return  # no lock
        if age > _STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
            return
        time.sleep(0.5)


def build_extension(verbose: bool = False) -> dict:
    """Compile (or load the cached build of) the packed kernels into this process.

    Tries ``-O3 -march=native`` first, then portable ``-O3``, both with OpenMP (``at::parallel_for`` then runs on
    PyTorch's threads), then serial ``-O3``. Returns ``{"variant", "isa", "flags", "seconds", "library"}``
    (``seconds``: compile or cached-load time); raises ``RuntimeError`` with every error when nothing builds.
    """
    with _ext_lock:
        if _ext_state["info"] is not None:
            return _ext_state["info"]
        from torch.utils import cpp_extension

        errors = []
        sources = _sources_tag()
        extra = os.environ.get("SENSIQUANT_EXT_CFLAGS", "").split()
        for variant, cflags, ldflags in _FLAG_SETS:
            name = f"sensiquant_packed_{variant}_{sources}" + (f"_{_cpu_tag()}" if variant == "native" else "")
            if variant == "native" and extra:
                cflags = cflags + extra
                name += "_" + hashlib.sha1(" ".join(extra).encode()).hexdigest()[:6]
            start = time.perf_counter()
            try:
                build_dir = _private_dir(_private_dir(extension_dir()) / name)
                _remove_stale_lock(build_dir)
                _check_record(build_dir, name, sources)
                library = cpp_extension.load(
                    name=name, sources=[str(_CSRC / s) for s in _SOURCES], build_directory=str(build_dir),
                    extra_cflags=cflags, extra_ldflags=ldflags, is_python_module=False, verbose=verbose,
                )
                _write_record(build_dir, build_dir / f"{name}.so", sources)
            except Exception as exc:  # any compiler, loader or cache failure: try the next flags
                errors.append(f"{variant} ({' '.join(cflags)}): {exc}")
                continue
            info = {"variant": variant, "isa": str(torch.ops.sensiquant.isa()), "flags": cflags,
                    "seconds": round(time.perf_counter() - start, 2), "library": str(library)}
            _ext_state.update(tried=True, info=info, error=None)
            return info
        _ext_state.update(tried=True, error="\n".join(errors))
        raise RuntimeError("could not build the sensiquant packed kernels:\n" + "\n".join(errors))


def extension_available() -> bool:
    """True when the packed kernels are loaded (building them on the first call unless ``SENSIQUANT_NO_EXT``)."""
    if _ext_state["info"] is not None:
        return True
    if _ext_state["tried"]:
        return False
    if os.environ.get("SENSIQUANT_NO_EXT", "") not in ("", "0"):
        _ext_state.update(tried=True, error="disabled by SENSIQUANT_NO_EXT")
        return False
    try:
        build_extension()
    except RuntimeError:
        return False
    return True


def extension_error() -> str | None:
    return _ext_state["error"]


def extension_loaded() -> bool:
    """True when the kernels are already loaded (never builds)."""
    return _ext_state["info"] is not None
