"""Block by block quantization with block-output tuning (:mod:`sensiquant.methods.signround`).

Two streams of calibration activations go through the decoder blocks: the full-precision model's and the quantized
model's. For each block: its full-precision output on the full-precision stream is the target; its layers start
from the method's solution (GPTQ or GPTAQ on the statistics of the streams, or round to nearest); their rounding is
tuned so the block's output on the quantized stream matches the target; the tuned layers are stored, and the
quantized block produces the next block's quantized stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.sequential import (
    BlockStore,
    block_asymmetric_statistics,
    block_hessians,
    capture_block_inputs,
    hidden_of,
    run_block,
    run_on_stream,
    with_hidden,
)
from ..format.qweight import QuantizedWeight
from ..methods.signround import SignRoundConfig, TunableWeight, TunedLinear, TuneResult, sign_round
from ..runtime.walk import set_module


def tuning_batches(windows: torch.Tensor, config: SignRoundConfig) -> list[dict]:
    """Calibration windows (n, seqlen) cut into samples of ``config.seqlen`` tokens, in batches of
    ``config.batch_size`` samples (model keyword arguments)."""
    n, seqlen = windows.shape
    length = min(config.seqlen, seqlen)
    samples = windows[:, : seqlen // length * length].reshape(-1, length)
    return [{"input_ids": samples[i:i + config.batch_size]} for i in range(0, samples.shape[0], config.batch_size)]


def tune_blocks(model: nn.Module, prefix: str, blocks: nn.ModuleList, batches: list[dict], layer_names: list[str],
                start: Callable[[str, dict[str, torch.Tensor]], TunableWeight],
                finish: Callable[[str, QuantizedWeight], None], config: SignRoundConfig,
                needs: frozenset[str] = frozenset(), progress: bool = True, store: BlockStore | None = None
                ) -> dict[int, TuneResult]:
    """Quantize and tune the layers ``layer_names`` of every block. ``start(name, stats)`` builds a layer's
    tunable start from the statistics ``needs`` names ("hessian" of its quantized-stream inputs, GPTAQ's
    "asym_cross"); ``finish(name, qweight)`` swaps the tuned layer into the model. Blocks ``store`` has kept
    are swapped in instead of tuned; the others are handed to it when done. Returns each block's tuning
    losses."""
    results: dict[int, TuneResult] = {}
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        with torch.no_grad():
            inputs = capture_block_inputs(model, blocks[0], batches)
        fp = [hidden_of(a, k) for a, k in inputs]
        bar = tqdm(blocks, desc="tuned blocks", disable=not progress)
        for i, block in enumerate(bar):
            names = [n for n in layer_names if n.startswith(f"{prefix}.{i}.")]
            kept = bool(names) and store is not None and store.has(i)
            with torch.no_grad():
                if "asym_cross" in needs and names and not kept:
                    stats, targets = block_asymmetric_statistics(model, block, inputs, fp, names)
                else:
                    targets = run_on_stream(block, inputs, fp)
                    stats = ({n: {"hessian": h} for n, h in block_hessians(model, block, inputs, names).items()}
                             if "hessian" in needs and names and not kept else {})
            if kept:  # the targets above came from the full-precision block, before its kept layers replace it
                results[i] = TuneResult(**store.install(i, names)["tuning"])
            elif names:
                tunables = {}
                for n in names:
                    layer = model.get_submodule(n)
                    tunables[n] = start(n, stats.pop(n, {}))
                    set_module(model, n, TunedLinear(tunables[n], layer.bias))

                def run(j: int, block=block, inputs=inputs) -> torch.Tensor:
                    return run_block(block, *inputs[j])

                with torch.enable_grad():
                    results[i] = sign_round(list(tunables.values()), run, targets, config)
                bar.set_postfix(loss=f"{min(results[i].loss_start, results[i].loss_end):.3g}")
                for n, t in tunables.items():
                    finish(n, t.finalize())
                if store is not None:
                    store.finish(i, names, {"tuning": dataclasses.asdict(results[i])})
            with torch.no_grad():
                inputs = [with_hidden(a, k, run_block(block, a, k)) for a, k in inputs]
            fp = targets
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
    return results
