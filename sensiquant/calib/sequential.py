"""Block-by-block calibration (as in GPTQ): the inputs of each repeated block are captured once, then every block
is calibrated on the outputs of the already-quantized blocks before it, so later layers see the errors of earlier
ones. Works with any model whose quantizable layers sit in one nn.ModuleList of blocks (decoder layers)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .inputs import HessianAccumulator
from .windows import as_batches


class _Captured(Exception):
    pass


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
    acc = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda _m, a, add=acc[n].add: add(a[0]))
               for n in names]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: a.h for n, a in acc.items()}


@torch.no_grad()
def calibrate_sequentially(model: nn.Module, prefix: str, blocks: nn.ModuleList, batches, layer_names: list[str],
                           quantize_block: Callable[[dict[str, torch.Tensor]], None], progress: bool = True) -> None:
    """For each block: gather its layers' input Hessians, call ``quantize_block`` with them (it swaps the layers),
    then run the quantized block to produce the next block's inputs."""
    inputs = capture_block_inputs(model, blocks[0], batches)
    for i, block in enumerate(tqdm(blocks, desc="gptq blocks", disable=not progress)):
        names = [n for n in layer_names if n.startswith(f"{prefix}.{i}.")]
        if names:
            quantize_block(block_hessians(model, block, inputs, names))
        outputs = []
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            outputs.append(with_hidden(args, kwargs, out[0] if isinstance(out, tuple) else out))
        inputs = outputs
