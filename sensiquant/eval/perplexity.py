"""Perplexity with the GPTQ protocol: rows joined with a blank line, tokenized once, cut into non-overlapping
windows of ``seqlen`` tokens; PPL = exp(mean next-token NLL over all predicted tokens)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SensiquantError

SEQLEN = 2048  # the GPTQ protocol's window length


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    n_windows: int
    seqlen: int
    n_tokens: int  # tokens predicted
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(n_windows, seqlen) token ids; the ragged end of the text is dropped."""
    if seqlen < 2:
        raise SensiquantError(f"seqlen must be at least 2, got {seqlen}")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise SensiquantError(f"text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    if max_windows is not None:
        if max_windows < 1:
            raise SensiquantError(f"max windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()  # not inference_mode: some peers' tensors (optimum-quanto) refuse inference tensors
def nll_of_windows(model, windows: torch.Tensor, progress: bool = False, desc: str = "ppl") -> tuple[float, int]:
    """Summed next-token NLL over the (n, seqlen) windows and the number of predicted tokens."""
    device = next(model.parameters()).device
    total_nll, count = 0.0, 0
    for window in tqdm(windows, desc=desc, disable=not progress):
        ids = window.unsqueeze(0).to(device)
        logits = model(ids).logits[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total_nll, count


def perplexity_of_windows(model, windows: torch.Tensor, progress: bool = True, desc: str = "ppl") -> PerplexityResult:
    start = time.perf_counter()
    total_nll, count = nll_of_windows(model, windows, progress, desc)
    nll = total_nll / count
    return PerplexityResult(math.exp(nll) if nll < 700 else math.inf, nll, windows.shape[0], windows.shape[1], count,
                            time.perf_counter() - start)


def perplexity(model, tokenizer, text: str, seqlen: int = SEQLEN, max_windows: int | None = None,
               progress: bool = True, desc: str = "ppl") -> PerplexityResult:
    """Perplexity of ``model`` on ``text``."""
    return perplexity_of_windows(model, tokenize_windows(tokenizer, text, seqlen, max_windows), progress, desc)
