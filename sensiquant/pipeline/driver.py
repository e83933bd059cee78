"""The one driver every quantization runs through (uniform, GPTQ, GWQ, plans): walk the model, gather only the
statistics the method and the outlier saliency need, pick outliers, quantize layer by layer (block by block on the
outputs of the quantized blocks when the method needs input statistics) and swap in QuantLinear."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib import (
    GradientStats,
    calibrate_sequentially,
    calibration_windows,
    find_block_list,
    gradient_statistics,
    input_statistics,
)
from ..calib.distributed import broadcast_tensors, rank, shard, world_size
from ..errors import SensiquantError
from ..format.spec import LayerSpec
from ..methods.base import LayerStats, method_name, needed_statistics, quantize_layer
from ..methods.outliers import select_outliers
from ..methods.signround import TunableWeight, start_point
from ..runtime.device import model_device, to_device
from ..runtime.qlinear import QuantLinear
from ..runtime.walk import find_linears, set_module
from .blockwise import tune_blocks, tuning_batches
from .config import QuantConfig
from .report import LayerReport, QuantReport
from .resume import ResumeState

_GRADIENT_STATS = frozenset({"grad_abs_sum", "grad_sq_sum"})
_INPUT_STATS = frozenset({"hessian", "input_norm", "asym_cross"})


def check_finite(layers: dict[str, nn.Linear]) -> None:
    """One clear error naming the first layer whose weight holds NaN or Inf, before any work."""
    for name, layer in layers.items():
        bad = int((~torch.isfinite(layer.weight.detach())).sum())
        if bad:
            raise SensiquantError(f"layer {name} has {bad} non-finite weight value{'s' if bad > 1 else ''} "
                                  "(NaN or Inf): the model is broken before quantization")


class _KeptBlocks:
    """The blocks an interrupted run of this job finished (:class:`~.resume.ResumeState`), as a BlockStore."""

    def __init__(self, state: ResumeState, model: nn.Module, install: Callable[[str, dict], None]):
        self.state, self.model, self._install = state, model, install

    def has(self, i: int) -> bool:
        return self.state.has_block(i)

    def install(self, i: int, names: list[str]) -> dict:
        tensors, meta = self.state.block(i)
        if sorted(tensors) != sorted(names):
            raise SensiquantError(f"the resume state in {self.state.root} does not match this model (block {i}); "
                                  "remove it to start afresh")
        for name in names:
            self._install(name, tensors[name])
        return meta

    def finish(self, i: int, names: list[str], meta: dict) -> None:
        self.state.save_block(i, {n: self.model.get_submodule(n).stored_tensors() for n in names}, meta)


def _fit_gguf(name: str, spec: LayerSpec, in_features: int) -> LayerSpec:
    """A GGUF spec whose blocks do not tile the rows takes llama.cpp's fallback type (format/ggml.py)."""
    try:
        return spec.fitted(in_features)
    except SensiquantError as exc:
        raise SensiquantError(f"{name}: {exc}") from None


def quantize_model(model: nn.Module, config: QuantConfig, tokenizer=None, progress: bool = True,
                   calib_batches: list[dict] | None = None, resume: ResumeState | None = None,
                   gradients: GradientStats | None = None) -> QuantReport:
    """Quantize ``model`` in place as ``config`` says; returns the per-layer report.

    Calibration windows come from ``config.calib`` (needs ``tokenizer``) unless ``calib_batches`` (model input
    dicts, e.g. with images for a vision-language model) are given; nothing is calibrated when neither the method
    nor the outlier saliency needs statistics. With ``resume`` the gradient statistics and every finished block
    are kept there as they are done, and what an interrupted run of the same job kept is used instead of redone.
    ``gradients``: statistics already gathered on ``config.calib``'s windows of this very model (e.g. by the plan
    being applied), used instead of a second gradient pass over the same windows.
    """
    start = time.perf_counter()
    layers = find_linears(model, config.skip)
    if not layers:
        raise SensiquantError("no linear layers to quantize (check the skip patterns)")
    check_finite(layers)
    specs = {name: _fit_gguf(name, config.spec_of(name), layer.in_features) for name, layer in layers.items()}
    if config.tuning is not None and any(spec.gguf for spec in specs.values()):
        raise SensiquantError("block tuning does not tune GGUF grids yet: quantize them with GPTQ or round them")
    ratios = {name: spec.outlier_ratio for name, spec in specs.items()}
    method_needs = needed_statistics(config.method)
    outlier_needs = config.outliers.needs if any(r > 0 for r in ratios.values()) else frozenset()
    needs = method_needs | outlier_needs  # config.needs restricted to the layers this model has
    asymmetric = "asym_cross" in method_needs
    extra: dict = {}

    windows = calib_batches
    if windows is None and (needs or config.tuning is not None):
        if tokenizer is None:
            raise SensiquantError(f"{', '.join(sorted(needs))} need calibration text, and there is no tokenizer")
        windows = calibration_windows(tokenizer, config.calib)
    if windows is not None:  # every statistic is gathered on the device the model sits on, each rank on its share
        if world_size() > 1 and config.tuning is not None:
            raise SensiquantError("block tuning does not run in several processes yet: run it in one")
        windows = to_device(shard(windows), model_device(model))
    stats: dict[str, dict[str, torch.Tensor]] = {name: {} for name in layers}
    if needs & _GRADIENT_STATS:
        kept = resume.gradients() if resume is not None else None
        if kept is None:
            grads = gradients if gradients is not None else gradient_statistics(
                model, windows, layers, getattr(torch, config.calib.grad_dtype), config.calib.checkpointing, progress)
            kept = grads.abs_sum, grads.sq_sum, {"gradient_seconds": grads.seconds, "calib_loss": grads.loss}
            if resume is not None:
                resume.save_gradients(*kept)
        for name in layers:
            stats[name].update(grad_abs_sum=kept[0][name], grad_sq_sum=kept[1][name])
        extra.update(kept[2])

    # block by block for the method's input statistics; the saliency's always come from the full-precision model
    tuned = config.tuning is not None
    blocks = (find_block_list(model, list(layers)) if tuned or ("hessian" in method_needs and config.sequential)
              else None)
    if tuned and blocks is None:
        raise SensiquantError("block tuning needs a model whose layers sit in a list of blocks (decoder layers)")
    in_blocks = [name for name in layers if blocks is not None and name.startswith(blocks[0] + ".")]
    one_pass = list(layers) if outlier_needs & _INPUT_STATS else [n for n in layers if n not in in_blocks]
    if needs & _INPUT_STATS and one_pass:
        inputs = input_statistics(model, windows, {name: layers[name] for name in one_pass}, progress)
        for name in one_pass:
            stats[name].update(hessian=inputs.hessian[name], input_norm=inputs.col_norm[name])
            if asymmetric:  # calibrated on the full-precision model, where both streams are one: no cross term
                stats[name]["asym_cross"] = torch.zeros_like(inputs.hessian[name])
        extra["input_seconds"] = inputs.seconds

    masks = select_outliers({name: layer.weight.detach() for name, layer in layers.items()}, ratios,
                            config.outliers, {name: LayerStats(**s) for name, s in stats.items()})
    report = QuantReport()
    q_start = time.perf_counter()

    @torch.no_grad()
    def solve(name: str, layer_stats: LayerStats) -> dict[str, torch.Tensor]:
        layer = layers[name]
        try:
            qweight = quantize_layer(layer.weight.detach().float(), specs[name], config.method, layer_stats,
                                     masks.get(name))
        except ValueError as exc:
            raise SensiquantError(f"{name}: {exc}") from exc
        return qweight.to_tensors()

    def quantize_many(names: list[str], layer_stats: Callable[[str], LayerStats]) -> None:
        """Quantize and install ``names``; under torchrun each rank solves every N-th layer and sends it to the
        others (the statistics are the same on every rank, so the result is what each would have computed)."""
        world = world_size()
        if world == 1:
            for name in names:
                install(name, solve(name, layer_stats(name)))
            return
        mine, error = {}, None
        for j, name in enumerate(names):
            if j % world == rank() and error is None:
                try:
                    mine[name] = solve(name, layer_stats(name))
                except SensiquantError as exc:
                    error = str(exc)
        failed = None  # the first error in layer order: the same on every rank
        for j, name in enumerate(names):
            owner = j % world
            try:
                install(name, broadcast_tensors(mine.pop(name, None), owner, error if owner == rank() else None))
            except SensiquantError as exc:
                failed = failed or exc
        if failed is not None:
            raise failed

    def store(name: str, qweight) -> None:
        install(name, qweight.to_tensors())

    def install(name: str, tensors: dict[str, torch.Tensor]) -> None:
        layer = layers[name]
        bias = None if layer.bias is None else layer.bias.detach().clone()
        qlinear = QuantLinear(layer.in_features, layer.out_features, specs[name], tensors, bias)
        set_module(model, name, qlinear)
        report.layers[name] = LayerReport((layer.out_features, layer.in_features), specs[name],
                                          qlinear.storage_bits(), qlinear.n_outliers)
        stats.pop(name, None)

    kept_blocks = None if resume is None else _KeptBlocks(resume, model, install)

    rest = [name for name in layers if name not in in_blocks]
    for name in tqdm(rest, desc=method_name(config.method), disable=not progress or not rest):
        install(name, solve(name, LayerStats(**stats[name])))
    if in_blocks and tuned:
        def tunable(name: str, block_stats: dict[str, torch.Tensor]) -> TunableWeight:
            try:
                point = start_point(layers[name].weight, specs[name], config.method, mask=masks.get(name),
                                    **block_stats)
            except ValueError as exc:
                raise SensiquantError(f"{name}: {exc}") from exc
            return TunableWeight(point, specs[name], config.tuning.tune_scale, config.tuning.scale_range)

        if not isinstance(windows, torch.Tensor):
            raise SensiquantError("block tuning calibrates on token windows, not on prepared input batches")
        results = tune_blocks(model, blocks[0], blocks[1], tuning_batches(windows, config.tuning), in_blocks,
                              tunable, store, config.tuning, method_needs & _INPUT_STATS, progress, kept_blocks)
        extra["tuning_loss"] = {str(i): [r.loss_start, min(r.loss_start, r.loss_end)] for i, r in results.items()}
    elif in_blocks:
        def quantize_block(block_stats: dict[str, dict[str, torch.Tensor]]) -> None:
            quantize_many(list(block_stats), lambda name: LayerStats(**block_stats[name]))

        calibrate_sequentially(model, blocks[0], blocks[1], windows, in_blocks, quantize_block, progress,
                               asymmetric, kept_blocks)
    report.layers = {name: report.layers[name] for name in layers}  # module order
    if resume is not None and resume.resumed:
        extra["resumed"] = list(resume.resumed)
    if extra:
        extra["quantize_seconds"] = time.perf_counter() - q_start
    report.extra = extra
    report.seconds = time.perf_counter() - start
    return report
