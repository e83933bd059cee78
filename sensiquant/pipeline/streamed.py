"""Quantization with one decoder block's weights in memory at a time (``--stream``), for models larger than memory.

The same job as :func:`~.driver.quantize_model`, in the same order and with the same arithmetic, so the checkpoint
equals the in-memory run's: the gradient pass runs block by block (:mod:`sensiquant.calib.streamed`), each block's
gradient scores go to disk as soon as its backward is done, and then every block is read once more, calibrated on
the quantized blocks' outputs, quantized (outliers from its scores) and kept quantized while its fp32 weights are
dropped. Peak memory: one block in fp32, the embeddings and head, the calibration activations and the quantized
blocks. With a resume state the scores and the finished blocks survive an interruption.

Not streamed yet (one error line each): block tuning, GPTAQ, plans, saliencies from input statistics, global
outlier scope, and layers outside the blocks that need calibration.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calib import calibration_windows
from ..calib.distributed import world_size
from ..calib.sequential import block_hessians, capture_block_inputs, run_block, with_hidden
from ..calib.streamed import streamed_gradient_statistics
from ..errors import SensiquantError
from ..io.safetensors import mmap_safetensors, write_safetensors
from ..io.streamed import StreamedModel, release_freed_memory, to_meta
from ..methods.base import LayerStats, method_name, needed_statistics, quantize_layer
from ..methods.outliers import select_outliers
from ..runtime.qlinear import QuantLinear
from ..runtime.walk import find_linears, set_module
from .config import QuantConfig
from .driver import _GRADIENT_STATS, _INPUT_STATS, _fit_gguf, check_finite
from .report import LayerReport, QuantReport
from .resume import ResumeState, fault_point, join_scores, split_scores


def _refuse(config: QuantConfig, calib_batches) -> None:
    reasons = []
    if config.tuning is not None:
        reasons.append("block tuning")
    if "asym_cross" in needed_statistics(config.method):
        reasons.append("GPTAQ")
    if config.outliers.needs & _INPUT_STATS:
        reasons.append(f"the {config.outliers.saliency} saliency")
    if config.outliers.scope != "matrix":
        reasons.append("a global outlier scope")
    if calib_batches is not None:
        reasons.append("prepared calibration batches")
    if world_size() > 1:
        reasons.append("several processes")
    if reasons:
        raise SensiquantError(f"streaming does not support {', '.join(reasons)} yet: run without --stream")


class _Scores:
    """Each block's gradient scores, in the resume state when there is one, else in a scratch folder."""

    def __init__(self, state: ResumeState | None, scratch: Path):
        self.state, self.folder = state, scratch

    def done(self) -> dict | None:
        return self.state.streamed_gradients_done() if self.state is not None else None

    def save(self, i: int, abs_sum: dict, sq_sum: dict) -> None:
        if self.state is not None:
            self.state.save_block_gradients(i, abs_sum, sq_sum)
        else:
            write_safetensors(join_scores(abs_sum, sq_sum), self.folder / f"grad-{i:05d}.safetensors")

    def finish(self, meta: dict) -> None:
        if self.state is not None:
            self.state.finish_streamed_gradients(meta)

    def load(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        if self.state is not None:
            return self.state.block_gradients(i)
        views = mmap_safetensors(self.folder / f"grad-{i:05d}.safetensors")
        return split_scores({k: v.clone() for k, v in views.items()})


def quantize_streamed(streamed: StreamedModel, config: QuantConfig, tokenizer=None, progress: bool = True,
                      calib_batches=None, resume: ResumeState | None = None) -> QuantReport:
    """Quantize ``streamed.model`` as ``config`` says, one block in memory at a time (module docstring); the
    model ends with its blocks quantized and in memory, its embeddings and head still on disk
    (``streamed.load_all()`` reads them). Returns the per-layer report."""
    _refuse(config, calib_batches)
    start = time.perf_counter()
    model, prefix, blocks = streamed.model, streamed.prefix, streamed.blocks
    layers = find_linears(model, config.skip)
    if not layers:
        raise SensiquantError("no linear layers to quantize (check the skip patterns)")
    specs = {name: _fit_gguf(name, config.spec_of(name), layer.in_features) for name, layer in layers.items()}
    in_blocks = [n for n in layers if n.startswith(prefix + ".")]
    rest = [n for n in layers if n not in in_blocks]
    ratios = {name: spec.outlier_ratio for name, spec in specs.items()}
    method_needs = needed_statistics(config.method)
    outlier_needs = config.outliers.needs if any(r > 0 for r in ratios.values()) else frozenset()
    lazy = [n for n in rest if layers[n].weight.device.type == "meta"]
    if lazy:
        raise SensiquantError(f"streaming keeps {lazy[0]} (the embeddings or the head) in full precision: skip it "
                              "or run without --stream")
    if rest and (method_needs or any(ratios[n] > 0 for n in rest)):
        raise SensiquantError(f"streaming calibrates only the layers inside the blocks, and {rest[0]} lies outside; "
                              "skip it or run without --stream")
    needs = method_needs | outlier_needs
    extra: dict = {"streamed": True}
    windows = None
    if needs:
        if tokenizer is None:
            raise SensiquantError(f"{', '.join(sorted(needs))} need calibration text, and there is no tokenizer")
        windows = calibration_windows(tokenizer, config.calib).to(streamed.device)
    dtype = getattr(torch, config.calib.grad_dtype)
    report = QuantReport()

    # scratch (boundary activations, and the scores when nothing is kept): inside the resume state when there is
    # one, so that it goes with it
    with tempfile.TemporaryDirectory(prefix="sensiquant-stream-", dir=None if resume is None else resume.root) as tmp:
        scores = _Scores(resume, Path(tmp))
        if needs & _GRADIENT_STATS:
            kept = scores.done()
            if kept is None:
                loss, seconds = streamed_gradient_statistics(streamed, windows, in_blocks, scores.save,
                                                             Path(tmp) / "hidden", dtype, progress)
                kept = {"gradient_seconds": seconds, "calib_loss": loss}
                scores.finish(kept)
            extra.update(kept)

        def install(name: str, tensors: dict[str, torch.Tensor]) -> None:
            layer = model.get_submodule(name)
            bias = None if layer.bias is None else layer.bias.detach().clone()
            qlinear = QuantLinear(layer.in_features, layer.out_features, specs[name], tensors, bias)
            set_module(model, name, qlinear)
            to_meta(layer)  # ``layers`` still names it: its fp32 weight must not stay alive through it
            report.layers[name] = LayerReport((layer.out_features, layer.in_features), specs[name],
                                              qlinear.storage_bits(), qlinear.n_outliers)

        q_start = time.perf_counter()
        for name in rest:  # no calibration (checked above): round to nearest as the method says
            layer = layers[name]
            check_finite({name: layer})
            install(name, quantize_layer(layer.weight.detach().float(), specs[name], config.method).to_tensors())
        calls = None
        if "hessian" in method_needs:
            with torch.no_grad(), streamed.part("embed"):
                calls = capture_block_inputs(model, blocks[0], [{"input_ids": w.unsqueeze(0)} for w in windows])
        for i in tqdm(range(len(blocks)), desc=f"{method_name(config.method)} blocks (streamed)",
                      disable=not progress):
            names = [n for n in in_blocks if n.startswith(f"{prefix}.{i}.")]
            kept = bool(names) and resume is not None and resume.has_block(i)
            block = streamed.load_block(i)  # the norms stay; the linears are replaced by their quantized form
            if kept:
                tensors, _ = resume.block(i)
                if sorted(tensors) != sorted(names):
                    raise SensiquantError(f"the resume state in {resume.root} does not match this model (block "
                                          f"{i}); remove it to start afresh")
                for name in names:
                    install(name, tensors[name])
            elif names:
                block_layers = {n: model.get_submodule(n) for n in names}
                check_finite(block_layers)
                stats: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
                masks = {}
                if any(ratios[n] > 0 for n in names):
                    grads = scores.load(i) if outlier_needs & _GRADIENT_STATS else {}
                    device = streamed.device
                    masks = select_outliers({n: block_layers[n].weight.detach() for n in names}, ratios,
                                            config.outliers,
                                            {n: LayerStats(**{k: v.to(device) for k, v in grads.get(n, {}).items()})
                                             for n in names})
                if calls is not None:
                    with torch.no_grad():
                        for n, h in block_hessians(model, block, calls, names).items():
                            stats[n]["hessian"] = h
                for n in names:
                    try:
                        qweight = quantize_layer(block_layers[n].weight.detach().float(), specs[n], config.method,
                                                 LayerStats(**stats.pop(n)), masks.get(n))
                    except ValueError as exc:
                        raise SensiquantError(f"{n}: {exc}") from exc
                    install(n, qweight.to_tensors())
                if resume is not None:
                    resume.save_block(i, {n: model.get_submodule(n).stored_tensors() for n in names}, {})
                else:
                    fault_point(f"block:{i}")
            streamed.keep(i)  # quantized: it stays
            release_freed_memory()  # its fp32 weights, Hessians and solver buffers
            if calls is not None:
                with torch.no_grad():
                    for j, (a, k) in enumerate(calls):  # in place: one window's old and new states at a time
                        calls[j] = with_hidden(a, k, run_block(block, a, k))
    report.layers = {name: report.layers[name] for name in layers}  # module order
    if resume is not None and resume.resumed:
        extra["resumed"] = list(resume.resumed)
    extra["quantize_seconds"] = time.perf_counter() - q_start
    report.extra = extra
    report.seconds = time.perf_counter() - start
    return report
