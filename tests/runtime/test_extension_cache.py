"""The extension cache: code is loaded only from a directory private to this user, and a cached library only when
it matches the record of its own build (no compiler run here: the record logic on a fake build)."""

import os

import pytest

from sensiquant.runtime import extension


def _fake_build(tmp_path, name="lib"):
    build = extension._private_dir(tmp_path / "build")
    (build / f"{name}.so").write_bytes(b"\x7fELF built")
    extension._write_record(build, build / f"{name}.so", "sources-A")
    return build


def test_private_dir_is_made_private(tmp_path):
    path = tmp_path / "cache"
    path.mkdir(mode=0o777)
    path.chmod(0o777)
    extension._private_dir(path)
    assert path.stat().st_mode & 0o077 == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_cache_owned_by_another_user_is_refused(tmp_path):
    path = tmp_path / "theirs"
    path.mkdir()
    os.chown(path, 65534, 65534)
    with pytest.raises(RuntimeError, match="another user"):
        extension._private_dir(path)


def test_matching_build_is_kept(tmp_path):
    build = _fake_build(tmp_path)
    extension._check_record(build, "lib", "sources-A")
    assert (build / "lib.so").read_bytes() == b"\x7fELF built"


@pytest.mark.parametrize("change", ["library-replaced", "other-sources", "no-record"])
def test_mismatching_build_is_discarded(tmp_path, change):
    build = _fake_build(tmp_path)
    sources = "sources-A"
    if change == "library-replaced":
        (build / "lib.so").write_bytes(b"\x7fELF evil")
    elif change == "other-sources":
        sources = "sources-B"
    else:
        (build / extension._RECORD).unlink()
    extension._check_record(build, "lib", sources)
    assert build.is_dir() and list(build.iterdir()) == []  # rebuilt from nothing on the next load
