"""Evaluation and calibration text: named sets (``wikitext2``, ``c4``) from a local data directory, the hub when
the ``datasets`` library is installed and online, or any plain text file.

The data directory comes from the ``data_dir`` argument, else ``$SENSIQUANT_DATA_DIR``, else ``../shared/data``
next to the working directory or next to the source checkout. Its layout is that of ``shared/data``::

    wikitext-2-raw/wiki.test.raw, wiki.valid.raw     one row a line, a blank row is a line holding one space
    c4/c4_validation_2k.jsonl                        {"text": ...} a line
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SensiquantError

NAMED_SETS = ("wikitext2", "c4")
_WIKITEXT_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.raw"}
_C4_FILE = "c4_validation_2k.jsonl"


def find_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The first existing candidate data directory, or None."""
    candidates = []
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise SensiquantError(f"data directory not found: {path}")
        return path
    if os.environ.get("SENSIQUANT_DATA_DIR"):
        candidates.append(Path(os.environ["SENSIQUANT_DATA_DIR"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


def wikitext_rows(path: Path) -> list[str]:
    """Rebuild the Hugging Face ``wikitext-2-raw-v1`` rows from a raw file.

    A row on the hub keeps its trailing newline (" = Robert Boulter = \\n") and a blank row is "" — the raw file
    stores each row on a line and a blank row as a single space.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return ["" if line.strip() == "" else line + "\n" for line in lines]


def c4_rows(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _hub_rows(name: str, split: str) -> list[str]:
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise SensiquantError(
            f"dataset {name!r} not found locally: pass --data-dir (or set SENSIQUANT_DATA_DIR) to a folder laid out "
            "like shared/data, or install `datasets` to read it from the hub"
        ) from exc
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            return list(load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
        ds = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                          split="validation")
        return list(ds["text"][:1100])
    except Exception as exc:  # offline, or the hub refused
        raise SensiquantError(f"could not read {name!r} from the hub ({exc}); use a local data directory") from exc


def load_rows(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> list[str]:
    """Rows of a named set (``wikitext2`` test/validation, ``c4`` validation) or of a text file (one row)."""
    path = Path(name)
    if path.suffix in (".txt", ".raw", ".jsonl") or path.is_file():
        if not path.is_file():
            raise SensiquantError(f"text file not found: {path}")
        if path.suffix == ".jsonl":
            return c4_rows(path)
        return [path.read_text(encoding="utf-8")]
    if name not in NAMED_SETS:
        raise SensiquantError(f"unknown dataset {name!r}: use {', '.join(NAMED_SETS)} or a path to a text file")
    if name == "wikitext2" and split not in _WIKITEXT_FILES:
        raise SensiquantError(f"wikitext2 has splits {', '.join(_WIKITEXT_FILES)}, not {split!r}")
    root = find_data_dir(data_dir)
    if root is not None:
        local = (root / "wikitext-2-raw" / _WIKITEXT_FILES[split]) if name == "wikitext2" else root / "c4" / _C4_FILE
        if local.is_file():
            return wikitext_rows(local) if name == "wikitext2" else c4_rows(local)
        if data_dir is not None:
            raise SensiquantError(f"{name} file missing from the data directory: {local}")
    return _hub_rows(name, "test" if name == "wikitext2" and split == "test" else split)


def load_text(name: str, split: str = "test", data_dir: str | os.PathLike | None = None) -> str:
    """The evaluation text of a set: its rows joined with a blank line, as in the GPTQ protocol."""
    return "\n\n".join(load_rows(name, split, data_dir))
