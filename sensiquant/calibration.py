"""Calibration data flow: sample token windows, then gather per-layer statistics from a model.

- ``calibration_windows``: seeded random windows of a text set (default WikiText-2 validation).
- ``gradient_statistics``: back-propagate the causal-LM loss window by window and accumulate, for every selected
  weight, sum |g| and sum g^2 in a compact dtype. Gradients never pile up: a post-accumulate hook folds each
  weight's gradient into its score buffers and frees it, no optimizer state exists, only the selected weights
  require grad, and gradient checkpointing (where the model supports it) trades compute for activation memory.
- ``input_statistics``: forward hooks collect each layer's input Hessian H = 2/n X^T X and per-column norms.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import load_text
from .errors import SensiquantError
from .quant.gptq import accumulate_hessian


def calibration_windows(tokenizer, source: str = "wikitext2", n_samples: int = 4, seqlen: int = 2048,
                        seed: int = 0, data_dir=None) -> torch.Tensor:
    """(n_samples, seqlen) token windows starting at seeded random offsets of the set's calibration split."""
    if n_samples < 1:
        raise SensiquantError(f"calibration samples must be at least 1, got {n_samples}")
    split = "validation" if source in ("wikitext2", "c4") else "test"
    ids = tokenizer(load_text(source, split, data_dir), return_tensors="pt").input_ids[0]
    if ids.numel() <= seqlen:
        raise SensiquantError(f"calibration text has {ids.numel()} tokens, not more than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


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


def as_batches(windows) -> list[dict]:
    """Calibration batches as model keyword arguments: token windows (n, seqlen) or a list of input dicts
    (for multimodal models: input_ids plus pixel_values and whatever else the model takes)."""
    if isinstance(windows, torch.Tensor):
        return [{"input_ids": w.unsqueeze(0)} for w in windows]
    return list(windows)


def gradient_statistics(model: nn.Module, windows, layers: dict[str, nn.Linear],
                        dtype: torch.dtype = torch.bfloat16, checkpointing: bool = True,
                        progress: bool = True) -> GradientStats:
    """Sum over windows of |dL/dW| and (dL/dW)^2 for the weight of every layer in ``layers``."""
    start = time.perf_counter()
    batches = as_batches(windows)
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
    return GradientStats(abs_sum, sq_sum, len(batches), time.perf_counter() - start, total_loss / len(batches))


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


@dataclass
class InputStats:
    hessian: dict[str, torch.Tensor]  # 2/n X^T X, (in, in) float32
    col_norm: dict[str, torch.Tensor]  # ||x_j|| over all calibration tokens, (in,)
    n_tokens: int
    seconds: float


class HessianAccumulator:
    """Running H = 2/n sum x x^T and sum of x_j^2 over the rows of the inputs it is fed."""

    def __init__(self, in_features: int):
        self.h = torch.zeros(in_features, in_features)
        self.sq = torch.zeros(in_features)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h, self.n = accumulate_hessian(self.h, x, self.n)
        self.sq += x.pow(2).sum(0)


@torch.no_grad()
def input_statistics(model: nn.Module, windows, layers: dict[str, nn.Linear],
                     progress: bool = True) -> InputStats:
    """Input Hessians and column norms of every layer in ``layers`` from one forward pass per window."""
    start = time.perf_counter()
    batches = as_batches(windows)
    acc = {name: HessianAccumulator(layer.in_features) for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: acc[name].add(args[0]))
               for name, layer in layers.items()]
    try:
        for batch in tqdm(batches, desc="inputs", disable=not progress):
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return InputStats({n: a.h for n, a in acc.items()}, {n: a.sq.sqrt() for n, a in acc.items()},
                      sum(int(b["input_ids"].numel()) for b in batches), time.perf_counter() - start)
