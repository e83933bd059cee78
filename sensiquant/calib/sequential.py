"""Block-by-block calibration (as in GPTQ): the inputs of each repeated block are captured once, then every block
is calibrated on the outputs of the already-quantized blocks before it, so later layers see the errors of earlier
ones. Works with any model whose quantizable layers sit in one nn.ModuleList of blocks (decoder layers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from .distributed import all_mean
from .inputs import HessianAccumulator, accumulate_hessian
from .windows import as_batches


class _Captured(Exception):
    pass


class BlockStore(Protocol):
    """Finished blocks kept from an earlier, interrupted run (``sensiquant.pipeline.resume``)."""

    def has(self, i: int) -> bool:
        """Whether block ``i``'s layers were finished and kept."""

    def install(self, i: int, names: list[str]) -> dict:
        """Swap block ``i``'s kept layers ``names`` into the model; returns what was recorded with them."""

    def finish(self, i: int, names: list[str], meta: dict) -> None:
        """Keep block ``i``'s just finished layers ``names`` (and ``meta``)."""


def find_block_list(model: nn.Module, layer_names: list[str]) -> tuple[str, nn.ModuleList] | None:
    """The nn.ModuleList holding the most of ``layer_names`` (the decoder layers), or None."""
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and name:
            count = sum(n.startswith(name + ".") for n in layer_names)
            if count and (best is None or count > best[2]):
                best = (name, module, count)
    return None if best is None else (best[0], best[1])


@torch.no_grad()
def capture_block_inputs(model: nn.Module, block: nn.Module, batches) -> list[tuple[tuple, dict]]:
    """(args, kwargs) with which ``block`` is called, one per calibration batch; the rest of the model is skipped."""
    captured = []

    def stop(_module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        for batch in as_batches(batches):
            try:
                model(**batch, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """A block's captured call with its hidden states replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


@torch.no_grad()
def block_hessians(model: nn.Module, block: nn.Module, inputs: list[tuple[tuple, dict]], names: list[str]
                   ) -> dict[str, torch.Tensor]:
    """Input Hessians of the layers ``names`` (inside ``block``) from running the block on its captured calls."""
    acc = {n: HessianAccumulator(model.get_submodule(n).in_features, model.get_submodule(n).weight.device)
           for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, add=acc[n].add: add(a[0]))
               for n in names]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: a.reduced()[0] for n, a in acc.items()}


def run_block(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states ``block`` returns for one captured call (decoder layers return a tuple or a tensor)."""
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_on_stream(block: nn.Module, inputs: list[tuple[tuple, dict]], hidden: list[torch.Tensor]
                  ) -> list[torch.Tensor]:
    """The block's outputs for its captured calls with their hidden states replaced by ``hidden`` (another
    stream of activations, e.g. the full-precision model's)."""
    return [run_block(block, *with_hidden(a, k, h)) for h, (a, k) in zip(hidden, inputs, strict=True)]


@torch.no_grad()
def block_asymmetric_statistics(model: nn.Module, block: nn.Module, inputs: list[tuple[tuple, dict]],
                                fp_hidden: list[torch.Tensor], names: list[str]
                                ) -> tuple[dict[str, dict[str, torch.Tensor]], list[torch.Tensor]]:
    """GPTAQ's statistics of the layers ``names``: for each, the Hessian of its inputs X~ on the quantized stream
    (``inputs``) and the cross term 2/n (X - X~)^T X~ against its inputs X on the full-precision stream
    (``fp_hidden``, the same calls with other hidden states). Also returns the block's full-precision outputs
    (the next block's full-precision stream)."""
    layers = {n: model.get_submodule(n) for n in names}
    h = {n: None for n in names}
    c = {n: None for n in names}
    seen = dict.fromkeys(names, 0)
    fp_x: dict[str, torch.Tensor] = {}
    mode = ["fp"]

    def hook(_m, a, name):
        x = a[0].detach()
        if mode[0] == "fp":
            fp_x[name] = x
            return
        x = x.reshape(-1, x.shape[-1]).float()
        delta = fp_x.pop(name).reshape(-1, x.shape[-1]).float() - x
        c[name], _ = accumulate_hessian(c[name], x, seen[name], left=delta)
        h[name], seen[name] = accumulate_hessian(h[name], x, seen[name])

    handles = [layer.register_forward_pre_hook(lambda m, a, name=n: hook(m, a, name)) for n, layer in layers.items()]
    fp_out = []
    try:
        for hidden, (args, kwargs) in zip(fp_hidden, inputs, strict=True):
            mode[0] = "fp"
            fp_out.append(run_block(block, *with_hidden(args, kwargs, hidden)))
            mode[0] = "quantized"
            block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {n: {"hessian": all_mean(h[n], seen[n])[0], "asym_cross": all_mean(c[n], seen[n])[0]}
            for n in names}, fp_out


def hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states of a captured block call."""
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def calibrate_sequentially(model: nn.Module, prefix: str, blocks: nn.ModuleList, batches, layer_names: list[str],
                           quantize_block: Callable[[dict[str, dict[str, torch.Tensor]]], None],
                           progress: bool = True, asymmetric: bool = False, store: BlockStore | None = None
                           ) -> None:
    """For each block: gather its layers' input statistics, call ``quantize_block`` with them ({layer: {"hessian":
    H}}; it swaps the layers), then run the quantized block to produce the next block's inputs. With
    ``asymmetric`` the full-precision stream is carried too and each layer also gets GPTAQ's ``asym_cross``.
    Blocks ``store`` has kept are swapped in instead of quantized; the others are handed to it when done."""
    inputs = capture_block_inputs(model, blocks[0], batches)
    fp_hidden = [hidden_of(a, k) for a, k in inputs] if asymmetric else None
    for i, block in enumerate(tqdm(blocks, desc="gptq blocks", disable=not progress)):
        names = [n for n in layer_names if n.startswith(f"{prefix}.{i}.")]
        if names and store is not None and store.has(i):
            if asymmetric:  # the full-precision stream goes through the block before its kept layers replace it
                fp_hidden = run_on_stream(block, inputs, fp_hidden)
            store.install(i, names)
        else:
            if asymmetric:
                stats, fp_hidden = block_asymmetric_statistics(model, block, inputs, fp_hidden, names)
            else:
                stats = {n: {"hessian": h} for n, h in block_hessians(model, block, inputs, names).items()}
            if names:
                quantize_block(stats)
                if store is not None:
                    store.finish(i, names, {})
        outputs = []
        for args, kwargs in inputs:
            outputs.append(with_hidden(args, kwargs, run_block(block, args, kwargs)))
        inputs = outputs
