"""The gradient pass: back-propagate the causal-LM loss window by window and accumulate, for every selected weight,
sum |g| and sum g^2 in a compact dtype. Gradients never pile up: a post-accumulate hook folds each weight's gradient
into its score buffers and frees it, no optimizer state exists, only the selected weights require grad.

Plain-head decoders (LLaMA, Qwen2, ...) go block by block (:mod:`.streamed`: forward keeping the block boundaries,
then backward block by block in reverse), the very computation a streamed run makes, so that in-memory and streamed
runs get the same scores bit for bit; other models back-propagate through the whole model, with gradient
checkpointing where the model supports it."""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import all_sum
from .windows import as_batches


@dataclass
class GradientStats:
    abs_sum: dict[str, torch.Tensor]
    sq_sum: dict[str, torch.Tensor]
    n_samples: int
    seconds: float
    loss: float  # mean calibration loss


@contextmanager
def _only_these_require_grad(model: nn.Module, params: list[nn.Parameter]):
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None


def fold_gradients(layers: dict[str, nn.Linear], dtype: torch.dtype
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list]:
    """Score buffers (sum |g|, sum g^2 in ``dtype``) for every layer's weight, and the post-accumulate hooks that
    fold each gradient into them as soon as it is complete and free it (remove the handles when done)."""
    abs_sum = {n: torch.zeros_like(m.weight, dtype=dtype) for n, m in layers.items()}
    sq_sum = {n: torch.zeros_like(m.weight, dtype=dtype) for n, m in layers.items()}
    handles = []
    for name, layer in layers.items():
        def fold(param, name=name):
            g = param.grad.float()
            abs_sum[name] += g.abs().to(dtype)
            sq_sum[name] += g.pow(2).to(dtype)
            param.grad = None
        handles.append(layer.weight.register_post_accumulate_grad_hook(fold))
    return abs_sum, sq_sum, handles


def gradient_statistics(model: nn.Module, windows, layers: dict[str, nn.Linear],
                        dtype: torch.dtype = torch.bfloat16, checkpointing: bool = True,
                        progress: bool = True, blockwise: bool | None = None) -> GradientStats:
    """Sum over windows of |dL/dW| and (dL/dW)^2 for the weight of every layer in ``layers``: block by block where
    the model allows it (``blockwise=None``; False forces the whole-model backward)."""
    from .streamed import resident_blocks, streamed_gradient_statistics

    start = time.perf_counter()
    batches = as_batches(windows)
    source = resident_blocks(model, list(layers)) if blockwise is not False else None
    if blockwise and source is None:
        raise ValueError("this model or layer set has no block-by-block gradient pass")
    if source is not None:
        abs_sum, sq_sum = {}, {}
        was_training = model.training
        model.eval()
        try:
            with tempfile.TemporaryDirectory(prefix="sensiquant-gradients-") as scratch:
                loss, _ = streamed_gradient_statistics(
                    source, batches, list(layers), lambda i, a, s: (abs_sum.update(a), sq_sum.update(s)),
                    Path(scratch), dtype, progress)
        finally:
            model.train(was_training)
        return _reduced(abs_sum, sq_sum, len(batches), loss * len(batches), start)
    abs_sum, sq_sum, handles = fold_gradients(layers, dtype)
    was_training = model.training
    use_ckpt = checkpointing and getattr(model, "supports_gradient_checkpointing", False)
    total_loss = 0.0
    try:
        with _only_these_require_grad(model, [m.weight for m in layers.values()]):
            if use_ckpt:
                _checkpointing(model, True)
                model.train()  # checkpointing is only active in training mode; LLaMA-style models have no dropout
            for batch in tqdm(batches, desc="gradients", disable=not progress):
                loss = model(**batch, labels=batch["input_ids"], use_cache=False).loss
                loss.backward()
                total_loss += float(loss.detach())
    finally:
        for h in handles:
            h.remove()
        if use_ckpt:
            _checkpointing(model, False)
        model.train(was_training)
    return _reduced(abs_sum, sq_sum, len(batches), total_loss, start)


def _reduced(abs_sum: dict, sq_sum: dict, n_batches: int, total_loss: float, start: float) -> GradientStats:
    """Several processes: each rank's sums over its windows, added up (squares before the sum, as Fisher needs)."""
    abs_sum = {n: all_sum(t) for n, t in abs_sum.items()}
    sq_sum = {n: all_sum(t) for n, t in sq_sum.items()}
    n_windows = int(all_sum(torch.tensor(float(n_batches))))
    total_loss = float(all_sum(torch.tensor(total_loss, dtype=torch.float64)))
    return GradientStats(abs_sum, sq_sum, n_windows, time.perf_counter() - start, total_loss / n_windows)


def _checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation (gradient) checkpointing on or off, across transformers versions."""
    kwargs = {"use_reentrant": False}
    if on and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
