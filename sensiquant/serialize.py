"""Versioned JSON round-trip for typed configs: every config is a frozen dataclass with ``to_dict`` /
``from_dict``, ``to_json`` / ``from_json``, and a ``version`` written into its dict; and the atomic text write
that every JSON result goes through."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

from .errors import SensiquantError


class Config:
    """Mixin for frozen config dataclasses. Subclasses bump ``VERSION`` when a field changes meaning and read older
    dicts in :meth:`_migrate`; nested configs convert themselves in ``__post_init__`` (see :func:`coerce`)."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **{f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise SensiquantError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        version = data.pop("version", None)
        if version is not None and (not isinstance(version, int) or version > cls.VERSION):
            raise SensiquantError(f"{cls.__name__} version {version!r} is newer than this sensiquant "
                                  f"(reads up to {cls.VERSION})")
        data = cls._migrate(data, version)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise SensiquantError(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise SensiquantError(f"bad {cls.__name__}: {exc}") from None

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int | None) -> dict[str, Any]:
        """Rewrite a dict of an older version (``None``: written before configs carried versions)."""
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str):
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SensiquantError(f"{cls.__name__} is not valid JSON: {exc}") from None

    def replace(self, **changes):
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def coerce(obj, name: str, value) -> None:
    """Set a field of a frozen dataclass from ``__post_init__`` (to normalise a value or convert a nested dict)."""
    object.__setattr__(obj, name, value)


def _plain(value):
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on a normal exit it is flushed to disk and renamed over
    ``path``, on any other it is removed: the file is written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a text file whole or not at all (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
