"""The gradient pass of a model whose blocks are in memory one at a time (:class:`BlockSource`).

Forward: every calibration window goes through block 0, then block 1, ..., and the hidden states at each block
boundary are written to a scratch folder (fp32, so the backward recomputes exactly what the whole-model pass
computes). At the top the causal-LM loss of each window is back-propagated through the final norm and the head in
chunks of positions (a 150k-token vocabulary's logits for a whole window are never held). Backward: block by block
in reverse, the block is recomputed from its stored input with gradients on, the gradient at its output is
back-propagated, its layers' |g| and g^2 are folded into their scores per window (as the whole-model pass does),
and the gradient at its input is passed down. The same sums as a whole-model backward (to fp32 rounding), with one
block's weights in memory; :func:`~.gradients.gradient_statistics` runs this same code over a model in memory
(:class:`ResidentBlocks`), so that in-memory and streamed runs agree bit for bit."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .gradients import fold_gradients
from .sequential import capture_block_inputs, find_block_list, hidden_of, run_block, with_hidden
from .windows import as_batches

# causal LMs whose logits are exactly head(final norm(last block's output)): no scaling or soft-capping after it
PLAIN_HEAD = frozenset({"llama", "qwen2", "qwen3", "mistral", "phi3"})


class BlockSource(Protocol):
    """A model whose decoder blocks get their weights only while in use (``sensiquant.io.streamed``)."""

    model: nn.Module
    prefix: str
    blocks: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    device: torch.device

    def load_block(self, i: int) -> nn.Module: ...

    def free_block(self, i: int) -> None: ...

    def part(self, which: str) -> AbstractContextManager[nn.Module]:
        """The input embeddings ("embed") or the output head ("head"), in memory for the time of a ``with``."""


class ResidentBlocks:
    """A :class:`BlockSource` over a model that is all in memory: loading and freeing do nothing. The in-memory
    gradient pass runs through it, so that it computes exactly what a streamed run computes."""

    def __init__(self, model: nn.Module, prefix: str, blocks: nn.ModuleList):
        self.model, self.prefix, self.blocks = model, prefix, blocks
        self.norm = model.base_model.norm
        self.head = model.get_output_embeddings()
        self.device = next(model.parameters()).device

    def load_block(self, i: int) -> nn.Module:
        return self.blocks[i]

    def free_block(self, i: int) -> None:
        pass

    @contextmanager
    def part(self, which: str) -> Iterator[nn.Module]:
        yield self.model.get_input_embeddings() if which == "embed" else self.head


def resident_blocks(model: nn.Module, layer_names: list[str]) -> ResidentBlocks | None:
    """``model`` as a :class:`BlockSource` when block-by-block passes compute its loss exactly (a plain-head
    decoder whose ``layer_names`` all sit in its decoder blocks), else None."""
    if getattr(model.config, "model_type", None) not in PLAIN_HEAD or model.get_output_embeddings() is None:
        return None
    if getattr(getattr(model, "base_model", None), "norm", None) is None:
        return None
    found = find_block_list(model, layer_names)
    if found is None or not all(n.startswith(found[0] + ".") for n in layer_names):
        return None
    return ResidentBlocks(model, *found)


def _path(folder: Path, i: int) -> Path:
    return folder / f"hidden-{i:05d}.safetensors"


def _save(folder: Path, i: int, hidden: list[torch.Tensor]) -> None:
    from ..io.safetensors import write_safetensors

    write_safetensors({f"w{j:05d}": h for j, h in enumerate(hidden)}, _path(folder, i))


def _load(folder: Path, i: int, j: int, device: torch.device) -> torch.Tensor:
    """Window ``j`` of the stored input of block ``i``."""
    from ..io.safetensors import read_tensors

    return read_tensors(_path(folder, i), [f"w{j:05d}"])[f"w{j:05d}"].to(device)


@torch.no_grad()
def streamed_forward(source: BlockSource, batches: list[dict],
                     before_block: Callable[[int, list[torch.Tensor]], None] | None = None,
                     progress: bool = True, desc: str = "blocks") -> tuple[list, list[torch.Tensor]]:
    """Every batch through block 0, then block 1, ... (each block's weights read once): (the blocks' captured
    calls without their hidden states, the last block's outputs). ``before_block(i, hidden)`` sees the inputs of
    each block."""
    with source.part("embed"):
        calls = capture_block_inputs(source.model, source.blocks[0], batches)
    hidden = [hidden_of(a, k) for a, k in calls]
    calls = [with_hidden(a, k, None) for a, k in calls]  # the hidden states live in ``hidden`` alone
    for i in tqdm(range(len(source.blocks)), desc=desc, disable=not progress):
        if before_block is not None:
            before_block(i, hidden)
        block = source.load_block(i)
        try:
            for j, (a, k) in enumerate(calls):  # in place: one window's old and new states at a time
                hidden[j] = run_block(block, *with_hidden(a, k, hidden[j]))
        finally:
            source.free_block(i)
    return calls, hidden


LOGIT_CHUNK = 1 << 23  # logits per chunk at the top of the gradient pass: 32 MB in fp32, with its gradient and softmax


def top_loss_grad(norm: nn.Module, head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor,
                  chunk: int | None = None) -> tuple[float, torch.Tensor]:
    """(mean next-token loss of one window, its gradient at the final hidden states), the logits made
    ``chunk`` positions at a time (default: about :data:`LOGIT_CHUNK` logits a chunk). ``hidden`` (1, seqlen, dim),
    ``ids`` (1, seqlen)."""
    count = ids.shape[1] - 1
    chunk = chunk or max(16, LOGIT_CHUNK // head.weight.shape[0])
    grad = torch.zeros_like(hidden)
    total = 0.0
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        h = hidden[:, start:stop].detach().requires_grad_(True)
        logits = head(norm(h)).float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[0, start + 1:stop + 1],
                               reduction="sum") / count
        loss.backward()
        grad[:, start:stop] = h.grad
        total += float(loss.detach())
    return total, grad


def streamed_gradient_statistics(source: BlockSource, windows: torch.Tensor, layer_names: list[str],
                                 finish_block: Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], None],
                                 scratch: Path, dtype: torch.dtype = torch.bfloat16,
                                 progress: bool = True) -> tuple[float, float]:
    """Sum over windows of |dL/dW| and (dL/dW)^2 of every layer in ``layer_names`` (all inside the blocks),
    handed block by block (last block first) to ``finish_block(i, abs_sums, sq_sums)``; ``scratch`` holds the
    boundary activations meanwhile. Returns (mean calibration loss, seconds)."""
    start = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    model, blocks, prefix = source.model, source.blocks, source.prefix
    batches = as_batches(windows)
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        calls, hidden = streamed_forward(source, batches, lambda i, h: _save(scratch, i, h), progress,
                                         "gradients: forward")
        total_loss = 0.0
        grads: list[torch.Tensor | None] = []
        with source.part("head") as head:
            for j, batch in enumerate(batches):
                loss, g = top_loss_grad(source.norm, head, hidden[j], batch["input_ids"])
                hidden[j] = None
                total_loss += loss
                grads.append(g)
        del hidden
        for i in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="gradients: backward",
                      disable=not progress):
            names = [n for n in layer_names if n.startswith(f"{prefix}.{i}.")]
            block = source.load_block(i)
            try:
                block_layers = {n: model.get_submodule(n) for n in names}
                for layer in block_layers.values():
                    layer.weight.requires_grad_(True)
                abs_sum, sq_sum, handles = fold_gradients(block_layers, dtype)
                try:
                    for j, (a, k) in enumerate(calls):  # in place: the output gradient becomes the input's
                        x = _load(scratch, i, j, source.device).requires_grad_(i > 0)
                        with torch.enable_grad():
                            run_block(block, *with_hidden(a, k, x)).backward(grads[j])
                        grads[j] = x.grad if i > 0 else None
                finally:
                    for handle in handles:
                        handle.remove()
                _path(scratch, i).unlink()
                finish_block(i, abs_sum, sq_sum)
            finally:
                source.free_block(i)
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return total_loss / len(batches), time.perf_counter() - start
