"""Calibration data: which text, how many windows of how many tokens, the seed (:class:`CalibConfig`), and the
seeded windows themselves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import NAMED_SETS, load_text
from ..errors import SensiquantError
from ..serialize import Config


@dataclass(frozen=True)
class CalibConfig(Config):
    """Calibration windows: ``samples`` windows of ``seqlen`` tokens at seeded offsets of ``source`` (a named set's
    validation split, or a text file). Defaults are GWQ's best measured setting (BENCHMARKS.md, "GWQ")."""

    source: str = "wikitext2"
    samples: int = 16
    seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None
    grad_dtype: str = "bfloat16"  # the gradient pass accumulates its scores in this dtype
    checkpointing: bool = True  # the gradient pass recomputes activations instead of keeping them

    def __post_init__(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise SensiquantError(f"calibration samples must be at least 1, got {self.samples!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise SensiquantError(f"calibration window length must be at least 2 tokens, got {self.seqlen!r}")
        if self.grad_dtype not in ("bfloat16", "float16", "float32"):
            raise SensiquantError(f"gradient dtype must be bfloat16, float16 or float32, got {self.grad_dtype!r}")


def calibration_windows(tokenizer, config: CalibConfig) -> torch.Tensor:
    """(samples, seqlen) token windows starting at seeded random offsets of the set's calibration split."""
    split = "validation" if config.source in NAMED_SETS else "test"
    ids = tokenizer(load_text(config.source, split, config.data_dir), return_tensors="pt").input_ids[0]
    if ids.numel() <= config.seqlen:
        raise SensiquantError(f"calibration text has {ids.numel()} tokens, not more than one window of "
                              f"{config.seqlen}")
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.seqlen, (config.samples,), generator=gen)
    return torch.stack([ids[s : s + config.seqlen] for s in starts.tolist()])


def as_batches(windows) -> list[dict]:
    """Calibration batches as model keyword arguments: token windows (n, seqlen) or a list of input dicts
    (for multimodal models: input_ids plus pixel_values and whatever else the model takes)."""
    if isinstance(windows, torch.Tensor):
        return [{"input_ids": w.unsqueeze(0)} for w in windows]
    return list(windows)
