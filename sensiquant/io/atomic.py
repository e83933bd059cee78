"""Replacing a directory whole or not at all: fill a hidden temporary sibling, flush it to disk, then swap it into
place with one atomic ``renameat2(RENAME_EXCHANGE)`` (a plain rename when nothing is there yet). What was at the
path stays complete until the swap; a process killed half-way leaves at most a hidden sibling, which the next
replacement of that path removes."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import SensiquantError

_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.sensiquant-(?P<pid>\d+)-[0-9a-f]{8}\.tmp$")
USE_RENAME_EXCHANGE = True  # tests turn it off to exercise the fallback


@contextmanager
def replacing_directory(out: Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``out`` to fill; on a normal exit it is fsynced and put in place of
    ``out``; in every case the temporary (the unfinished new one, or the old one swapped out) is removed."""
    remove_stale_temporaries(out)
    tmp = _make_temporary(out)
    try:
        yield tmp
        _sync_tree(tmp)
        _put_in_place(tmp, out)
    finally:
        remove_tree(tmp)


def make_parent(out: Path, what: str) -> None:
    """Create the parent folders of ``out`` (one clear error when a file stands in their way) before a write."""
    ancestor = out.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SensiquantError(f"cannot write {what} to {out}: {ancestor} is a file")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SensiquantError(f"cannot create the parent directory of {out}: {exc.strerror}") from None


def _temporary_name(out: Path) -> Path:
    return out.parent / f".{out.name}.sensiquant-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def _make_temporary(out: Path) -> Path:
    for _ in range(100):
        tmp = _temporary_name(out)
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SensiquantError(f"cannot write the checkpoint {out}: {exc.strerror} ({out.parent})") from None
        return tmp
    raise SensiquantError(f"cannot create a temporary directory beside {out}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def temporary_siblings(out: str | Path) -> list[Path]:
    """The hidden temporary directories that saves to ``out`` left (or are using) beside it."""
    out = Path(os.path.realpath(os.path.abspath(os.fspath(out))))
    if not out.parent.is_dir():
        return []
    found = []
    for entry in os.scandir(out.parent):
        match = _TMP_NAME.match(entry.name)
        if match and match["name"] == out.name:
            found.append(Path(entry.path))
    return sorted(found)


def remove_stale_temporaries(out: str | Path) -> list[Path]:
    """Remove what killed saves to ``out`` left beside it (temporaries whose process is gone); returns them."""
    removed = []
    for path in temporary_siblings(out):
        if not _pid_alive(int(_TMP_NAME.match(path.name)["pid"])):
            remove_tree(path)
            removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    if os.path.lexists(path):
        shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            _fsync(Path(dirpath) / filename)
        _fsync(Path(dirpath))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where that is not available."""
    if not (USE_RENAME_EXCHANGE and sys.platform.startswith("linux")):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # glibc before 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _put_in_place(tmp: Path, out: Path) -> None:
    """Move the finished checkpoint ``tmp`` to ``out``; an old ``out`` ends up at ``tmp`` (removed by the caller)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
    elif not _rename_exchange(tmp, out):
        # fallback: the old checkpoint steps aside (still complete, under a hidden name), the new one steps in
        aside = _temporary_name(out)
        os.rename(out, aside)
        try:
            os.rename(tmp, out)
        except OSError:
            os.rename(aside, out)
            raise
        os.rename(aside, tmp)
    _fsync(out.parent)
