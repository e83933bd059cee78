"""Model-level statistics behind a plan: where each linear sits, what every ladder config costs and loses on it,
how sensitive each block part's output is (SensiBoost), and how heavy-tailed each weight is (KurtBoost).

The math lives in :mod:`sensiquant.planning.mxq`, :mod:`.outlier_layers` and :mod:`sensiquant.methods`; this module
walks the model and feeds it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calib.windows import as_batches
from ..format.accounting import storage_bits
from ..format.spec import HQQParams
from ..methods.gptq import GPTQConfig, gptq_factor, gptq_solve, gptq_solve_many
from ..methods.outliers import top_mask
from ..methods.round import quantize_weight
from .ladder import LadderConfig
from .outlier_layers import pearson_kurtosis

# Leaf names of the four SensiBoost block parts (LLaMA/Mistral/Qwen, GPT-NeoX/Falcon, Phi, OPT, Mixtral experts)
_PARTS = {
    "attn.qkv": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "qkv", "c_attn", "Wqkv"),
    "attn.o": ("o_proj", "out_proj", "dense", "c_proj_attn", "proj"),
    "mlp.gate_up": ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "dense_h_to_4h", "c_fc"),
    "mlp.down": ("down_proj", "w2", "fc2", "dense_4h_to_h", "c_proj"),
}
# The error table's cheap HQQ fit (``PlanConfig.error_fit="light"``): one solve without the fractional-zero
# candidate, at most 10 iterations; the fit of ``--preset fast``, which gave GWQ's PPL within the run-to-run spread
LIGHT_FIT = HQQParams(fractional_candidate=False, iters=10)
_LEAF_TO_PART = {leaf: part for part, leaves in _PARTS.items() for leaf in leaves}
_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class LayerSite:
    """Where a linear sits: its stack (e.g. "model.layers"), block index, module path inside the block, part."""

    name: str
    stack: str
    block: int | None
    module: str
    part: str


def layer_sites(names: Sequence[str]) -> dict[str, LayerSite]:
    """Split dotted names into (stack, block, module, part). With several stacks (a vision and a language tower),
    module and part keys carry the stack so that types of different towers are never compared."""
    raw = {}
    for name in names:
        m = _BLOCK.match(name)
        if m is None:
            raw[name] = ("", None, name)
        else:
            raw[name] = (m.group(1), int(m.group(2)), m.group(3))
    stacks = {stack for stack, block, _ in raw.values() if block is not None}
    sites = {}
    for name, (stack, block, module) in raw.items():
        leaf = module.rsplit(".", 1)[-1]
        part = _LEAF_TO_PART.get(leaf, module) if block is not None else module
        if leaf == "dense" and "attn" not in module and "attention" not in module:
            part = module  # "dense" is the attention output only inside an attention module
        if len(stacks) > 1 and block is not None:
            module, part = f"{stack}.*.{module}", f"{stack}.*.{part}"
        sites[name] = LayerSite(name, stack, block, module, part)
    return sites


def option_costs(layers: dict[str, nn.Linear], options: Sequence[tuple[LadderConfig, float]], grid: str,
                 outlier_format: str = "csr") -> np.ndarray:
    """Exact stored bits of every (layer, option), from the accounting function."""
    return np.array([[storage_bits(tuple(layer.weight.shape), c.spec(grid, r, outlier_format).fitted(layer.in_features))
                      for c, r in options] for layer in layers.values()], dtype=np.float64)


def sample_rows(n_rows: int, rows: int | None, seed: int) -> torch.Tensor | None:
    """Sorted indices of ``rows`` of ``n_rows`` output rows drawn without replacement (seeded), or None for all.

    Group-wise grids fit every row on its own, so the error of a row sample, scaled by ``n_rows / rows``, is an
    unbiased estimate of the whole matrix's error, and every option of a layer is measured on the same rows."""
    if rows is None or rows >= n_rows:
        return None
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_rows, generator=generator)[:rows].sort().values


@torch.no_grad()
def option_errors(layers: dict[str, nn.Linear], options: Sequence[tuple[LadderConfig, float]], grid: str,
                  saliency: dict[str, torch.Tensor] | None = None,
                  weight_importance: dict[str, torch.Tensor] | None = None, progress: bool = True,
                  outlier_format: str = "csr", rows: int | None = None, seed: int = 0,
                  hqq: HQQParams | None = None, grad_abs: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, np.ndarray]:
    """Reconstruction error of every (layer, option): quantize the weight with that option and measure.

    Returns {"frobenius": ||W - Q(W)||_F (MXQ)} and, when ``weight_importance`` (per-weight squared-gradient sums)
    is given, also {"fisher": sqrt(sum F * (W - Q(W))^2)}, an estimate of the loss increase that sees which weights
    matter; when ``grad_abs`` (per-weight sums of |g|) is given, {"abs_grad": sum |g| * |W - Q(W)|}, the
    first-order weight score of AutoRound's AutoScheme. Options with outliers keep the top-``ratio`` weights of the
    whole matrix by ``saliency``, stored in ``outlier_format``. With ``rows``, each matrix is measured on that many
    of its output rows (the same seeded sample for all its options, see :func:`sample_rows`) and the error scaled
    up to the whole matrix. ``hqq`` replaces the HQQ solver settings of every option (e.g. :data:`LIGHT_FIT`, for a
    cheaper estimate).
    """
    metrics = (["frobenius"] + (["fisher"] if weight_importance is not None else [])
               + (["abs_grad"] if grad_abs is not None else []))
    errors = {m: np.zeros((len(layers), len(options))) for m in metrics}
    for i, w, masks, scale, (importance, g_abs) in _sampled(layers, options, saliency, rows, seed, progress,
                                                             weight_importance, grad_abs):
        for j, (config, ratio) in enumerate(options):
            spec = _option_spec(config, ratio, grid, outlier_format, hqq, w.shape[1])
            diff = w - quantize_weight(w, spec, masks.get(ratio)).dequantize()
            if g_abs is not None:
                errors["abs_grad"][i, j] = float((diff.abs() * g_abs).sum()) * scale
            diff.square_()
            errors["frobenius"][i, j] = float(diff.sum().mul_(scale).sqrt())
            if importance is not None:
                errors["fisher"][i, j] = float(diff.mul_(importance).sum().mul_(scale).sqrt())
    return errors


def _sampled(layers: dict[str, nn.Linear], options, saliency, rows: int | None, seed: int, progress: bool,
             *per_weight: dict[str, torch.Tensor] | None):
    """Per layer of ``layers``: (index, weight rows, outlier masks per ratio, scale-up factor, the ``per_weight``
    tensors' same rows), the rows a seeded sample (:func:`sample_rows`) shared by every option of the layer."""
    ratios = sorted({r for _, r in options if r > 0})
    for i, (name, layer) in enumerate(tqdm(list(layers.items()), desc="config errors", disable=not progress)):
        w = layer.weight.detach().float()
        pick = sample_rows(w.shape[0], rows, seed + i)
        masks = {r: top_mask(saliency[name], r) for r in ratios}
        extra = [None if t is None else t[name].float() for t in per_weight]
        if pick is not None:
            masks = {r: m[pick] for r, m in masks.items()}
            extra = [None if t is None else t[pick] for t in extra]
        yield (i, w if pick is None else w[pick], masks, 1.0 if pick is None else w.shape[0] / len(pick),
               tuple(extra))


def _option_spec(config: LadderConfig, ratio: float, grid: str, outlier_format: str, hqq: HQQParams | None,
                 in_features: int):
    spec = config.spec(grid, ratio, outlier_format).fitted(in_features)
    return spec if hqq is None else spec.replace(hqq=hqq)


@torch.no_grad()
def option_output_errors(layers: dict[str, nn.Linear], options: Sequence[tuple[LadderConfig, float]], grid: str,
                         hessians: dict[str, torch.Tensor], weight_importance: dict[str, torch.Tensor],
                         saliency: dict[str, torch.Tensor] | None = None, gptq: GPTQConfig | None = None,
                         progress: bool = True, outlier_format: str = "csr", rows: int | None = None, seed: int = 0,
                         hqq: HQQParams | None = None) -> np.ndarray:
    """Loss-weighted output error of every (layer, option), measured with the method that will apply the plan:
    ``sqrt(sum_i G_i (W_i - Q_i) H/2 (W_i - Q_i)^T)`` over output rows i, where H = 2/n X^T X is the layer's input
    Hessian and G_i = sum_j F_ij / sum_j H_jj/2 the row's mean squared output gradient (K-FAC: F_ij ~ G_i E[x_j^2];
    F the per-weight squared-gradient sums). Unlike the diagonal Fisher metric it sees that GPTQ's errors cancel
    in the layer's output; with ``gptq`` the codes are GPTQ's (solved on the sampled rows, one factoring of H per
    layer), else they are rounded on the grid. Rows are sampled and scaled up as in :func:`option_errors`."""
    errors = np.zeros((len(layers), len(options)))
    names = list(layers)
    for i, w, masks, scale, (importance,) in _sampled(layers, options, saliency, rows, seed, progress,
                                                      weight_importance):
        h = hessians[names[i]].float()
        row_weight = importance.sum(1) / (torch.diagonal(h).sum() / 2).clamp_min(1e-30)
        specs = [_option_spec(config, ratio, grid, outlier_format, hqq, w.shape[1]) for config, ratio in options]
        option_masks = [masks.get(ratio) for _, ratio in options]
        if gptq is not None:
            factor = gptq_factor(h, gptq.damp, gptq.act_order)
            if gptq.act_order and not any(spec.gguf for spec in specs):  # every option in one sweep
                solved = gptq_solve_many(w, h, specs, option_masks, gptq.damp, gptq.block_size, factor)
            else:
                solved = [gptq_solve(w, h, spec, mask, gptq.damp, gptq.block_size, gptq.act_order, factor=factor)[0]
                          for spec, mask in zip(specs, option_masks, strict=True)]
        for j, spec in enumerate(specs):
            q = quantize_weight(w, spec, option_masks[j]).dequantize() if gptq is None else solved[j]
            diff = w - q
            per_row = ((diff @ h) * diff).sum(1) / 2
            errors[i, j] = float((per_row * row_weight).sum().clamp_min(0) * scale) ** 0.5
    return errors


def weight_kurtosis(layers: dict[str, nn.Linear]) -> dict[str, float]:
    """Pearson (non-excess) kurtosis of every weight matrix (KurtBoost)."""
    return {name: pearson_kurtosis(layer.weight) for name, layer in layers.items()}


@torch.no_grad()
def output_sensitivity(model: nn.Module, layers: dict[str, nn.Linear], windows, config: LadderConfig, grid: str,
                       progress: bool = True) -> dict[str, tuple[float, int]]:
    """Per linear: (sum of squared output errors, number of outputs) when that layer alone is quantized with
    ``config``, on full-precision inputs from the calibration ``windows`` (SensiBoost's activation sensitivity).

    Each layer's quantized weight is computed once, on first use; the model itself is not changed.
    """
    quantized: dict[str, torch.Tensor] = {}
    sums = {name: [0.0, 0] for name in layers}
    spec = config.spec(grid)

    def hook(module, args, output, name):
        if name not in quantized:
            w = module.weight.detach().float()
            quantized[name] = quantize_weight(w, spec.fitted(w.shape[1])).dequantize(module.weight.dtype)
        y_q = F.linear(args[0], quantized[name], module.bias)
        sums[name][0] += float((output.float() - y_q.float()).square().sum())
        sums[name][1] += output.numel()

    handles = [layer.register_forward_hook(lambda m, a, o, n=name: hook(m, a, o, n)) for name, layer in layers.items()]
    try:
        for batch in tqdm(as_batches(windows), desc="sensitivity", disable=not progress):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (s, n) for name, (s, n) in sums.items()}


def part_profiles(sites: dict[str, LayerSite], per_layer: dict[str, float], key: str = "part",
                  counts: dict[str, int] | None = None) -> dict[str, dict[int, float]]:
    """Values per type across blocks: {type: {block: value}} over the layers inside blocks.

    ``key`` is "part" (SensiBoost: q/k/v together, gate/up together) or "module" (one matrix per type). Several
    layers of one (type, block) are averaged; with ``counts`` the values are sums and the result is
    sum(values) / sum(counts), a pooled mean (the MSE over the part's concatenated outputs).
    """
    pooled: dict[str, dict[int, list[float]]] = {}
    for name, value in per_layer.items():
        site = sites[name]
        if site.block is None:
            continue
        acc = pooled.setdefault(getattr(site, key), {}).setdefault(site.block, [0.0, 0.0])
        acc[0] += value
        acc[1] += counts[name] if counts is not None else 1
    return {part: {b: by_block[b][0] / max(by_block[b][1], 1) for b in sorted(by_block)}
            for part, by_block in pooled.items()}


class Timer:
    """Wall time per named stage (plans report where their time went): ``with timer("errors"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
