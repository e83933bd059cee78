"""GWQ: gradient-aware weight quantization (arXiv 2411.00850).

Back-propagate the language-model loss on a few calibration windows, score every weight (|g| by default), keep the
top ``outlier_ratio`` of each matrix (or of the whole model) exactly in FP16 and quantize the rest group-wise with a
backend: RTN, HQQ, or GPTQ (outliers excluded from the grid fit and from GPTQ's error propagation, as in SpQR).
Other saliencies (Hessian/OBS, activation, magnitude, random) use the same storage, for comparison.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration import calibration_windows, gradient_statistics, input_statistics
from .config import LayerSpec, QuantConfig, _from_dict
from .errors import SensiquantError
from .nn import QuantLinear
from .quant import quantize_weight
from .quant.gptq import gptq_quantize
from .quant.saliency import GRADIENT_SALIENCIES, SALIENCIES, global_threshold, saliency_scores, top_mask
from .quantize import LayerReport, QuantReport
from .sequential import calibrate_sequentially, find_block_list
from .walk import find_linears, set_module

BACKENDS = ("rtn", "hqq", "gptq")

# The grid GWQ quantizes the non-outlier weights to when none is given: 3-bit, groups of 64, scales and zeros in
# 8 bits; GPTQ (act-order) on the HQQ grid. SmolLM2-135M: WikiText-2 27.30 / C4 55.90 at 3.598 bits/param.
DEFAULT_SPEC = LayerSpec(method="hqq", bits=3, group_size=64, quant_meta=True)


@dataclass
class GWQConfig:
    """Settings of a GWQ run; the per-matrix grid (bits, group size, metadata) comes from the LayerSpec."""

    backend: str = "gptq"
    saliency: str = "grad"
    # Defaults are the best setting measured on SmolLM2-135M at <= 3.6 bits/param (BENCHMARKS.md, "GWQ"): with
    # DEFAULT_SPEC (3-bit g64, 8-bit metadata) 0.99% |g| outliers land at 3.598 bits/param (1% would be 3.602).
    outlier_ratio: float = 0.0099
    outlier_scope: str = "matrix"  # "matrix": top ratio of every matrix; "global": of all matrices together
    calib: str = "wikitext2"
    calib_samples: int = 16  # WikiText-2 8 windows: 4 -> 28.67, 8 -> 27.60, 16 -> 27.30 PPL (wall time ~2x of 4)
    calib_seqlen: int = 2048
    seed: int = 0
    damp: float = 0.01  # GPTQ / Hessian-saliency dampening, share of mean diag(H)
    # GPTQ visits columns by descending Hessian diagonal (static groups). SmolLM2-135M 3-bit g128, 1% |g| outliers:
    # WikiText-2 37.9 -> 32.8, C4 88.1 -> 72.4 (BENCHMARKS.md), hence on by default.
    act_order: bool = True
    block_size: int = 128
    sequential: bool = True  # GPTQ: calibrate block by block on the outputs of the quantized blocks before
    checkpointing: bool = True
    score_dtype: str = "bfloat16"
    data_dir: str | None = None
    per_layer_ratios: bool = False  # take each layer's outlier share from its LayerSpec (plans), not outlier_ratio

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SensiquantError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKENDS)}")
        if self.saliency not in SALIENCIES:
            raise SensiquantError(f"unknown saliency {self.saliency!r}: choose one of {', '.join(SALIENCIES)}")
        if not 0.0 <= self.outlier_ratio < 0.5:
            raise SensiquantError(f"outlier ratio must be in [0, 0.5), got {self.outlier_ratio}")
        if self.outlier_scope not in ("matrix", "global"):
            raise SensiquantError(f"outlier scope must be 'matrix' or 'global', got {self.outlier_scope!r}")
        if self.calib_samples < 1:
            raise SensiquantError(f"calibration samples must be at least 1, got {self.calib_samples}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GWQConfig:
        return _from_dict(cls, dict(data))


@dataclass
class GWQStats:
    gradient_seconds: float = 0.0
    input_seconds: float = 0.0
    quantize_seconds: float = 0.0
    calib_loss: float | None = None


def gwq_quantize(model: nn.Module, tokenizer, config: QuantConfig, gwq: GWQConfig, progress: bool = True,
                 calib_batches: list[dict] | None = None) -> tuple[QuantReport, GWQStats]:
    """Quantize ``model`` in place with GWQ; returns the per-layer report and timings.

    Calibration comes from ``gwq.calib`` (text) unless ``calib_batches`` (model input dicts, e.g. with images for
    a vision-language model) are given.
    """
    stats = GWQStats()
    start = time.perf_counter()
    layers = find_linears(model, config.skip)
    if not layers:
        raise SensiquantError("no linear layers to quantize (check --skip)")
    needs_inputs = gwq.backend == "gptq" or gwq.saliency in ("hessian", "activation")
    ratios = {name: _ratio_of(name, config, gwq) for name in layers}
    needs_grads = gwq.saliency in GRADIENT_SALIENCIES and any(r > 0 for r in ratios.values())
    windows = calib_batches
    if windows is None and (needs_inputs or needs_grads):
        windows = calibration_windows(tokenizer, gwq.calib, gwq.calib_samples, gwq.calib_seqlen, gwq.seed,
                                      gwq.data_dir)
    grads = None
    if needs_grads:
        grads = gradient_statistics(model, windows, layers, getattr(torch, gwq.score_dtype), gwq.checkpointing,
                                    progress)
        stats.gradient_seconds, stats.calib_loss = grads.seconds, grads.loss

    blocks = find_block_list(model, list(layers)) if gwq.backend == "gptq" and gwq.sequential else None
    in_blocks = [n for n in layers if blocks is not None and n.startswith(blocks[0] + ".")]
    one_pass = list(layers) if gwq.saliency in ("hessian", "activation") else [n for n in layers if n not in in_blocks]
    inputs = None
    if needs_inputs and one_pass:
        inputs = input_statistics(model, windows, {n: layers[n] for n in one_pass}, progress)
        stats.input_seconds = inputs.seconds

    masks = _outlier_masks(layers, gwq, grads, inputs, ratios)
    report = QuantReport()
    q_start = time.perf_counter()

    def quantize_layer(name: str, hessian: torch.Tensor | None) -> None:
        layer = layers[name]
        spec = config.overrides.get(name, config.default)
        # GPTQ keeps the spec's grid (RTN or HQQ); the other backends are the grid
        grid = spec.method if gwq.backend == "gptq" else gwq.backend
        spec = dataclasses.replace(spec, method=grid, outlier_ratio=ratios[name])
        w = layer.weight.detach().float()
        if gwq.backend == "gptq":
            qweight = gptq_quantize(w, hessian, spec, masks.get(name), damp=gwq.damp, block_size=gwq.block_size,
                                    act_order=gwq.act_order)
        else:
            qweight = quantize_weight(w, spec, masks.get(name))
        bias = None if layer.bias is None else layer.bias.detach().clone()
        qlinear = QuantLinear.from_quantized(qweight, bias)
        set_module(model, name, qlinear)
        report.layers[name] = LayerReport(qweight.shape, spec, qlinear.storage_bits(), qlinear.n_outliers)

    rest = [n for n in layers if n not in in_blocks]
    for name in tqdm(rest, desc="gwq", disable=not progress or not rest):
        quantize_layer(name, None if inputs is None else inputs.hessian.get(name))
    if in_blocks:
        def quantize_block(hessians: dict[str, torch.Tensor]) -> None:
            for name, h in hessians.items():
                quantize_layer(name, h)

        calibrate_sequentially(model, blocks[0], blocks[1], windows, in_blocks, quantize_block, progress)
    report.layers = {n: report.layers[n] for n in layers}  # module order
    stats.quantize_seconds = time.perf_counter() - q_start
    report.seconds = time.perf_counter() - start
    return report, stats


def _ratio_of(name: str, config: QuantConfig, gwq: GWQConfig) -> float:
    if gwq.per_layer_ratios:
        return config.overrides.get(name, config.default).outlier_ratio
    return gwq.outlier_ratio


def _outlier_masks(layers, gwq: GWQConfig, grads, inputs, ratios: dict[str, float]) -> dict[str, torch.Tensor]:
    """Outlier mask of every layer: top ratio of its scores, or of all normalised scores (global scope)."""
    layers = {name: layer for name, layer in layers.items() if ratios[name] > 0}
    if not layers:
        return {}
    generator = torch.Generator().manual_seed(gwq.seed)
    scores = {name: saliency_scores(
        gwq.saliency, layer.weight.detach(),
        grad_abs_sum=None if grads is None else grads.abs_sum[name],
        grad_sq_sum=None if grads is None else grads.sq_sum[name],
        hessian=None if inputs is None else inputs.hessian.get(name),
        input_norm=None if inputs is None else inputs.col_norm.get(name),
        damp=gwq.damp, generator=generator) for name, layer in layers.items()}
    if gwq.outlier_scope == "matrix" or gwq.per_layer_ratios:
        return {name: top_mask(s, ratios[name]) for name, s in scores.items()}
    # normalise per matrix so that scores of differently scaled matrices compete fairly
    normalised = {name: _normalised(s) for name, s in scores.items()}
    threshold = global_threshold(list(normalised.values()), gwq.outlier_ratio)
    return {name: s >= threshold for name, s in normalised.items()}


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    return scores.float() / scores.float().mean().clamp_min(1e-30)
