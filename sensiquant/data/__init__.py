"""Text for calibration and evaluation: named sets (``wikitext2``, ``c4``) from a local data directory (or the hub),
or any text file."""

from .text import NAMED_SETS, find_data_dir, load_rows, load_text, wikitext_rows

__all__ = ["NAMED_SETS", "find_data_dir", "load_rows", "load_text", "wikitext_rows"]
