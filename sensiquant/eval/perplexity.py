"""Perplexity with the GPTQ protocol: rows joined with a blank line, tokenized once, cut into non-overlapping
windows of ``seqlen`` tokens; PPL = exp(mean next-token NLL over all predicted tokens)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calib.streamed import PLAIN_HEAD
from ..errors import SensiquantError

SEQLEN = 2048  # the GPTQ protocol's window length
LOGIT_CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in fp32) where the head is applied chunk by chunk
_CHUNKED_ABOVE = 1 << 26  # logits of one window above this many elements are made chunk by chunk


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


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", return_attention_mask=False).input_ids[0]


def leading_ids(tokenizer, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` ids of ``text`` (all of them if it has fewer), as tokenizing the whole text gives them,
    from prefixes of the text: tokenizing a 4.5 MB text at once holds about 400 MB. A prefix is taken once a longer
    one agrees with it on those ids (the cut changes only the tokens next to it)."""
    size = max(4096, 6 * n_tokens)
    while size < len(text):
        ids = _ids(tokenizer, text[:size])
        if ids.numel() > n_tokens + 16:
            longer = _ids(tokenizer, text[:size + size // 4 + 256])
            if torch.equal(longer[:n_tokens], ids[:n_tokens]):
                return ids[:n_tokens]
        size *= 2
    return _ids(tokenizer, text)[:n_tokens]


def tokenize_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(n_windows, seqlen) token ids; the ragged end of the text is dropped. With ``max_windows`` only as much of
    the text is tokenized as those windows need (the same ids)."""
    if seqlen < 2:
        raise SensiquantError(f"seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise SensiquantError(f"max windows must be at least 1, got {max_windows}")
    ids = _ids(tokenizer, text) if max_windows is None else leading_ids(tokenizer, text, max_windows * seqlen)
    n = ids.numel() // seqlen
    if n == 0:
        raise SensiquantError(f"text has {ids.numel()} tokens, shorter than one window of {seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


def _chunked_head(model, seqlen: int):
    """(base model, head) when the logits of a window are large and exactly ``head(base(ids))``, else None."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD or head is None:
        return None
    if seqlen * head.weight.shape[0] <= _CHUNKED_ABOVE:
        return None
    return model.base_model, head


def logit_chunk(head) -> int:
    """Positions per chunk of logits: about :data:`LOGIT_CHUNK_ELEMENTS` logits (55 for a 150k vocabulary)."""
    return max(16, LOGIT_CHUNK_ELEMENTS // head.weight.shape[0])


def chunked_nll(head, hidden: torch.Tensor, ids: torch.Tensor, chunk: int | None = None) -> float:
    """Summed next-token NLL of one window from its final hidden states (1, seqlen, dim), the logits made
    ``chunk`` positions at a time (a 150k-token vocabulary's logits of a whole window are never held)."""
    count = ids.shape[1] - 1
    chunk = chunk or logit_chunk(head)
    total = 0.0
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        logits = head(hidden[0, start:stop]).float()
        total += float(F.cross_entropy(logits, ids[0, start + 1:stop + 1], reduction="sum"))
    return total


@torch.no_grad()  # not inference_mode: some peers' tensors (optimum-quanto) refuse inference tensors
def nll_of_windows(model, windows: torch.Tensor, progress: bool = False, desc: str = "ppl") -> tuple[float, int]:
    """Summed next-token NLL over the (n, seqlen) windows and the number of predicted tokens. A model still being
    streamed (``sensiquant.io.streamed``: embeddings and head not in memory) is scored block by block."""
    streamed = getattr(model, "sensiquant_streamed", None)
    if streamed is not None and model.get_input_embeddings().weight.device.type == "meta":
        return streamed_nll(streamed, windows, progress, desc)
    device = next(model.parameters()).device
    chunked = _chunked_head(model, windows.shape[1])
    total_nll, count = 0.0, 0
    for window in tqdm(windows, desc=desc, disable=not progress):
        ids = window.unsqueeze(0).to(device)
        if chunked is not None:
            base, head = chunked
            total_nll += chunked_nll(head, base(ids).last_hidden_state, ids)
        else:
            logits = model(ids).logits[0, :-1].float()
            total_nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return total_nll, count


class _DequantizedOnce:
    """``source`` whose quantized layers dequantize once per block for all windows, not once per window."""

    def __init__(self, source):
        self.source = source

    def __getattr__(self, name: str):
        return getattr(self.source, name)

    def _hold(self, block, hold: bool) -> None:
        from ..runtime.qlinear import QuantLinear

        for module in block.modules():
            if isinstance(module, QuantLinear):
                module.hold_dequantized(hold)

    def load_block(self, i: int):
        block = self.source.load_block(i)
        self._hold(block, True)
        return block

    def free_block(self, i: int) -> None:
        self._hold(self.source.blocks[i], False)
        self.source.free_block(i)


@torch.no_grad()
def streamed_nll(source, windows: torch.Tensor, progress: bool = False, desc: str = "ppl") -> tuple[float, int]:
    """:func:`nll_of_windows` of a model whose blocks are in memory one at a time (``source``, a
    :class:`~sensiquant.calib.streamed.BlockSource`): every window through block 0, then block 1, ..., so each
    block is read once; the final norm and the head in chunks of positions."""
    from ..calib.streamed import streamed_forward

    batches = [{"input_ids": w.unsqueeze(0).to(source.device)} for w in windows]
    _, hidden = streamed_forward(_DequantizedOnce(source), batches, progress=progress, desc=desc)
    with source.part("head") as head:
        total = sum(chunked_nll(head, source.norm(h), b["input_ids"]) for h, b in zip(hidden, batches, strict=True))
    return total, len(batches) * (windows.shape[1] - 1)


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
