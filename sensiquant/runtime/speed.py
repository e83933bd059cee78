"""Inference speed of a causal LM at batch 1: prefill tokens/s, greedy decode tokens/s, peak resident memory.

The same measurement for every model (original, quantized, fast kernels): one warm-up pass, then the prompt in one
forward (prefill), then ``new_tokens`` single-token forwards that reuse the KV cache (decode). Greedy, no sampling,
so the generated tokens are also a correctness check between two ways of running the same weights.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field

import torch

from ..data import load_text
from ..errors import SensiquantError


@dataclass
class SpeedResult:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    peak_rss_mb: float
    threads: int
    decoder: str = "transformers"
    head_bits: int | None = None
    act8: bool = False
    generated: list[int] = field(default_factory=list, repr=False)

    def to_dict(self, with_tokens: bool = False) -> dict:
        d = asdict(self)
        if not with_tokens:
            d.pop("generated")
        return d


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prompt_ids(tokenizer, n_tokens: int, text: str | None = None, data_dir=None) -> torch.Tensor:
    """(1, n_tokens) ids: the first tokens of ``text`` (default: WikiText-2 test from ``data_dir`` when available,
    else a fixed sentence repeated)."""
    if n_tokens < 1:
        raise SensiquantError(f"prompt tokens must be at least 1, got {n_tokens}")
    if text is None:
        try:
            text = load_text("wikitext2", "test", data_dir)[: 20 * n_tokens]
        except SensiquantError:
            text = "The quick brown fox jumps over the lazy dog. " * (n_tokens // 4 + 1)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :n_tokens]
    while ids.shape[1] < n_tokens:  # a short text is repeated
        ids = torch.cat([ids, ids], dim=1)[:, :n_tokens]
    return ids


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float]:
    """Greedy tokens after ``input_ids`` with a KV cache; returns (tokens, prefill seconds, decode seconds)."""
    start = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(int(token))
    decode = time.perf_counter() - start
    return tokens, prefill, decode


DECODERS = ("auto", "lean", "transformers")
DEFAULT_DECODER = "auto"  # the lean path where it runs the model, else transformers' forward


def generator(model, decoder: str = DEFAULT_DECODER, max_len: int = 2048, head_bits: int | None = None,
              act8: bool = False):
    """(generate, name): a function with :func:`greedy_generate`'s contract (model bound) and the decoder it runs.

    ``lean`` is :class:`~sensiquant.runtime.decode.LeanDecoder` (static cache of ``max_len`` positions; raises
    :class:`~sensiquant.runtime.decode.LeanDecodeError` for models it does not run), ``transformers`` the model's
    own forward with its dynamic cache, ``auto`` the lean one when it runs the model. ``head_bits`` (lean only)
    runs the output head as an RTN-quantized copy; ``act8`` (lean only) rounds the packed layers' inputs to int8."""
    from .decode import LeanDecodeError, LeanDecoder, unsupported_reason

    if decoder not in DECODERS:
        raise SensiquantError(f"unknown decoder {decoder!r}: choose one of {', '.join(DECODERS)}")
    lean = decoder == "lean" or (decoder == "auto" and unsupported_reason(model) is None)
    if (head_bits is not None or act8) and not lean:
        reason = "--decoder transformers" if decoder == "transformers" else unsupported_reason(model)
        what = "a quantized head" if head_bits is not None else "int8 inputs (act8)"
        raise LeanDecodeError(f"{what} needs the lean decode path ({reason})")
    if lean:
        return LeanDecoder(model, max_len=max_len, head_bits=head_bits, act8=act8).generate, "lean"
    return (lambda ids, n: greedy_generate(model, ids, n)), "transformers"


def measure_speed(model, tokenizer, prompt_tokens: int = 512, new_tokens: int = 128, text: str | None = None,
                  warmup: bool = True, data_dir=None, decoder: str = DEFAULT_DECODER,
                  head_bits: int | None = None, act8: bool = False) -> SpeedResult:
    """Prefill and decode speed at batch 1 (the decode rate counts the new_tokens - 1 cached steps)."""
    if new_tokens < 2:
        raise SensiquantError(f"new tokens must be at least 2, got {new_tokens}")
    model.eval()
    ids = prompt_ids(tokenizer, prompt_tokens, text, data_dir)
    generate, name = generator(model, decoder, max_len=prompt_tokens + new_tokens, head_bits=head_bits, act8=act8)
    if warmup:  # first calls pay for kernel selection, weight repacking caches, lazy pages
        generate(ids[:, : min(32, prompt_tokens)], 4)
    tokens, prefill, decode = generate(ids, new_tokens)
    return SpeedResult(prompt_tokens, new_tokens, prefill, decode, prompt_tokens / prefill,
                       (new_tokens - 1) / decode, peak_rss_mb(), torch.get_num_threads(), name, head_bits, act8,
                       tokens)
