"""Input statistics of linear layers: the Hessian H = 2/n X^T X of their calibration inputs (GPTQ, the OBS
saliency) and per-column input norms (the activation saliency), from forward hooks in one pass."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import all_mean, all_sum
from .windows import as_batches


def accumulate_hessian(h: torch.Tensor | None, x: torch.Tensor, n_seen: int,
                       left: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Running ``H = 2/n * sum x x^T`` over calibration inputs ``x`` of shape (..., in_features); returns (H, n).

    With ``left`` (the same shape as ``x``) the running sum is ``2/n * sum left x^T`` instead: the cross term
    GPTAQ needs. ``h`` (float32) is updated in place when given, so a large layer's Hessian is never copied.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    a = x if left is None else left.reshape(-1, left.shape[-1]).float()
    m = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    if m == 0:
        return h, n_seen
    n = n_seen + m
    h.mul_(n_seen / n)
    h.addmm_(a.t(), x, alpha=2.0 / n)
    return h, n


@dataclass
class InputStats:
    hessian: dict[str, torch.Tensor]  # 2/n X^T X, (in, in) float32
    col_norm: dict[str, torch.Tensor]  # ||x_j|| over all calibration tokens, (in,)
    n_tokens: int
    seconds: float


class HessianAccumulator:
    """Running H = 2/n sum x x^T and sum of x_j^2 over the rows of the inputs it is fed."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.h = torch.zeros(in_features, in_features, device=device)
        self.sq = torch.zeros(in_features, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h, self.n = accumulate_hessian(self.h, x, self.n)
        self.sq += x.pow(2).sum(0)

    def reduced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, sum of x_j^2) over the inputs of every rank (this rank's alone with one process)."""
        return all_mean(self.h, self.n)[0], all_sum(self.sq)


@torch.no_grad()
def input_statistics(model: nn.Module, windows, layers: dict[str, nn.Linear],
                     progress: bool = True) -> InputStats:
    """Input Hessians and column norms of every layer in ``layers`` from one forward pass per window."""
    start = time.perf_counter()
    batches = as_batches(windows)
    acc = {name: HessianAccumulator(layer.in_features, layer.weight.device) for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(lambda _m, args, name=name: acc[name].add(args[0]))
               for name, layer in layers.items()]
    try:
        for batch in tqdm(batches, desc="inputs", disable=not progress):
            model(**batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    reduced = {n: a.reduced() for n, a in acc.items()}
    tokens = int(all_sum(torch.tensor(float(sum(int(b["input_ids"].numel()) for b in batches)))))
    return InputStats({n: h for n, (h, _) in reduced.items()}, {n: sq.sqrt() for n, (_, sq) in reduced.items()},
                      tokens, time.perf_counter() - start)
