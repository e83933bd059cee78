"""Plans for a memory budget: uniform HQQ, MXQ, SensiBoost and KurtBoost (arXiv 2503.06518), and our
budget-exact mode with optional GWQ outliers.

* **uniform**: the one ladder rung whose exact cost fits the budget best.
* **mxq**: one rung per matrix minimising the summed reconstruction error under the budget (integer program).
* **sensiboost** / **kurtboost**: MXQ, then the layers whose sensitivity (output MSE of the block part, on
  calibration data) or weight kurtosis jumps from the layer before (trimmed z-score > threshold) go ``stop`` rungs
  up. As in the paper this costs a little more than the budget (~2%).
* **exact** (ours, for mxq/sensiboost/kurtboost): the boosted layers are pinned and MXQ re-solves the rest, so the
  least important matrices pay for the boost and the total stays within the budget to the bit. With
  ``outlier_ratios`` the options also include GWQ FP16 outliers (0.5%, 1% ...) per matrix, costed exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .alloc import DEFAULT_LADDER, LadderConfig, change_zscores, detect_outlier_layers, solve_allocation, step_up
from .alloc.plan import Plan, PlanLayer
from .calibration import calibration_windows, gradient_statistics
from .config import _from_dict
from .errors import SensiquantError
from .quant.saliency import GRADIENT_SALIENCIES, saliency_scores
from .scoring import Timer, layer_sites, option_costs, option_errors, output_sensitivity, part_profiles, weight_kurtosis
from .walk import find_linears

PLAN_METHODS = ("uniform", "mxq", "sensiboost", "kurtboost")
# What `sensiquant quantize --budget` uses when no method is named: the best of bench/alloc.py (BENCHMARKS.md).
# SmolLM2-135M: beats uniform HQQ at every budget <= 3.51 (e.g. 3.26 bits/param: WikiText-2 62.3 -> 50.9).
BEST_METHOD = {"method": "sensiboost", "exact": True, "error_metric": "fisher", "outlier_ratios": [0.0, 0.005, 0.01]}


@dataclass
class PlanConfig:
    """How to make a plan. Defaults follow the SensiBoost/KurtBoost paper where it is specific (see docs)."""

    method: str = "sensiboost"
    budget: float = 3.25  # bits per parameter over the quantized linears, everything counted
    exact: bool = False  # boost inside the budget (ours) instead of on top of it (paper)
    ladder: list[str] = field(default_factory=lambda: [c.name for c in DEFAULT_LADDER])
    grid: str = "hqq"
    backend: str = "hqq"  # applying the plan: the grid directly, or "gptq" (error feedback, needs calibration)
    error_metric: str = "frobenius"  # MXQ's ||W - Q||_F, or "fisher": gradient-weighted (needs a gradient pass)
    outlier_ratios: list[float] = field(default_factory=lambda: [0.0])  # GWQ outlier shares a matrix may take
    outlier_saliency: str = "grad"
    stop: int = 2  # rungs a flagged layer goes up (paper: 2-3)
    threshold: float = 3.0  # z-score above which a layer is an outlier layer
    top_m: int | None = 3  # keep at most this many flagged (block, type) pairs, largest z first
    trim: float = 0.05  # share trimmed from each tail for the z-score's mean and std
    base: str = "auto"  # rung for the sensitivity measurement; auto = the uniform rung of the budget
    calib: str = "wikitext2"
    calib_samples: int = 32  # sensitivity windows (paper: 128 documents of <= 512 tokens)
    calib_seqlen: int = 512
    grad_samples: int = 4  # gradient windows, when outliers or the fisher metric need them
    grad_seqlen: int = 2048
    seed: int = 0
    data_dir: str | None = None
    skip: list[str] = field(default_factory=lambda: ["lm_head", "*embed*"])

    def __post_init__(self) -> None:
        if self.method not in PLAN_METHODS:
            raise SensiquantError(f"unknown plan method {self.method!r}: choose one of {', '.join(PLAN_METHODS)}")
        if not (isinstance(self.budget, int | float) and 0 < self.budget <= 32):
            raise SensiquantError(f"budget must be bits per parameter in (0, 32], got {self.budget!r}")
        if self.exact and self.method == "uniform":
            raise SensiquantError("the budget-exact mode needs an allocating method (mxq, sensiboost, kurtboost)")
        if self.grid not in ("hqq", "rtn") or self.backend not in ("hqq", "rtn", "gptq"):
            raise SensiquantError(f"grid must be hqq or rtn and backend hqq, rtn or gptq, got {self.grid!r}, "
                                  f"{self.backend!r}")
        if self.error_metric not in ("frobenius", "fisher"):
            raise SensiquantError(f"error metric must be 'frobenius' or 'fisher', got {self.error_metric!r}")
        if not self.outlier_ratios or any(not 0 <= r < 0.5 for r in self.outlier_ratios):
            raise SensiquantError(f"outlier ratios must be in [0, 0.5), got {self.outlier_ratios}")
        if any(r > 0 for r in self.outlier_ratios) and not self.exact:
            raise SensiquantError("GWQ outliers in a plan need the budget-exact mode (--exact)")
        if self.outlier_saliency not in GRADIENT_SALIENCIES + ("magnitude",):
            raise SensiquantError(f"plan outlier saliency must be one of grad, grad_weight, fisher, magnitude, "
                                  f"got {self.outlier_saliency!r}")
        if self.stop < 0 or self.calib_samples < 1 or self.grad_samples < 1:
            raise SensiquantError("stop must be >= 0 and calibration sample counts >= 1")
        self.ladder_configs()  # validates the names

    def ladder_configs(self) -> list[LadderConfig]:
        if not self.ladder:
            raise SensiquantError("the ladder is empty")
        return sorted({LadderConfig.from_name(n) for n in self.ladder}, key=lambda c: c.nominal_bits_per_param)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PlanConfig:
        return _from_dict(cls, dict(data))


def make_plan(model: nn.Module, tokenizer, config: PlanConfig, progress: bool = True, model_name: str = "",
              cache: dict | None = None) -> Plan:
    """Score ``model`` and allocate a config to every quantizable linear; the model is not changed.

    ``cache``: a dict kept by the caller to reuse gradients, config errors and sensitivities across plans of the
    same model (e.g. several budgets); stage times are only counted when the work is done.
    """
    timer = Timer()
    cache = {} if cache is None else cache
    layers = find_linears(model, config.skip)
    if not layers:
        raise SensiquantError("no linear layers to plan (check the skip patterns)")
    names = list(layers)
    sites = layer_sites(names)
    ladder = config.ladder_configs()
    options = [(c, r) for c in ladder for r in sorted(set(config.outlier_ratios)) if r == 0 or c.bits <= 4]
    option_index = {(c.name, r): j for j, (c, r) in enumerate(options)}
    costs = option_costs(layers, options, config.grid)
    n_params = sum(layer.weight.numel() for layer in layers.values())
    budget_bits = config.budget * n_params
    uniform = _uniform_rung(options, costs, budget_bits)

    plan = Plan(method=config.method, budget_bits_per_param=config.budget, layers=[], exact=config.exact,
                model=model_name, grid=config.grid, backend=config.backend, outlier_saliency=config.outlier_saliency,
                settings=config.to_dict())
    choice = np.full(len(names), option_index[(uniform.name, 0.0)] if uniform else 0, dtype=np.int64)
    reasons = [f"uniform {uniform.name}" if uniform else ""] * len(names)
    allocated = choice.copy()
    scores: dict[str, dict[str, float]] = {name: {} for name in names}

    if config.method == "uniform":
        if uniform is None:
            raise SensiquantError(f"no single rung fits {config.budget} bits/param "
                                  f"(cheapest: {ladder[0].name} at {costs[:, 0].sum() / n_params:.4f})")
    else:
        gradients = None
        if config.error_metric == "fisher" or any(r > 0 for r in config.outlier_ratios):
            key = ("gradients", config.calib, config.grad_samples, config.grad_seqlen, config.seed)
            if key not in cache:
                with timer("gradients"):
                    windows = calibration_windows(tokenizer, config.calib, config.grad_samples, config.grad_seqlen,
                                                  config.seed, config.data_dir)
                    cache[key] = gradient_statistics(model, windows, layers, torch.bfloat16, True, progress)
            gradients = cache[key]
        saliency = None
        if gradients is not None or config.outlier_saliency == "magnitude":
            saliency = {n: saliency_scores(config.outlier_saliency, layers[n].weight.detach(),
                                           grad_abs_sum=None if gradients is None else gradients.abs_sum[n],
                                           grad_sq_sum=None if gradients is None else gradients.sq_sum[n])
                        for n in names}
        errors = _error_table(layers, options, config, saliency, gradients, cache, timer, progress)
        with timer("allocate"):
            choice = solve_allocation(errors, costs, budget_bits)
        allocated = choice.copy()
        reasons = ["MXQ: least total error under the budget"] * len(names)

        if config.method in ("sensiboost", "kurtboost"):
            flagged = _flag_layers(model, tokenizer, layers, sites, config, uniform or ladder[0], plan, scores,
                                   timer, progress, cache)
            choice, reasons = _boost(flagged, names, sites, options, option_index, ladder, config, costs, errors,
                                     budget_bits, allocated, reasons, plan)
        for i, name in enumerate(names):
            scores[name][f"error_{config.error_metric}"] = float(errors[i, choice[i]])

    plan.layers = [
        PlanLayer(name=name, shape=tuple(layers[name].weight.shape), config=options[choice[i]][0].name,
                  outlier_ratio=options[choice[i]][1], bits=int(costs[i, choice[i]]), block=sites[name].block,
                  module=sites[name].module, part=sites[name].part, allocated=options[allocated[i]][0].name,
                  reason=reasons[i], scores=scores[name])
        for i, name in enumerate(names)]
    plan.seconds = timer.seconds
    return plan


def _error_table(layers, options, config: PlanConfig, saliency, gradients, cache: dict, timer: Timer,
                 progress: bool) -> np.ndarray:
    """Errors of every (layer, option) under the plan's metric; columns are cached per option so that plans at
    other budgets or with more options only quantize what is new (both metrics come from one quantization)."""
    grads_key = None if gradients is None else (config.calib, config.grad_samples, config.grad_seqlen, config.seed)

    def key(option, metric):
        config_, ratio = option
        return ("error", config.grid, metric, config_.name, ratio, config.outlier_saliency if ratio else None,
                grads_key if metric == "fisher" or ratio else None)

    missing = [o for o in options if key(o, config.error_metric) not in cache]
    if missing:
        with timer("errors"):
            tables = option_errors(layers, missing, config.grid, saliency,
                                   None if gradients is None else gradients.sq_sum, progress)
        for metric, table in tables.items():
            for j, option in enumerate(missing):
                cache[key(option, metric)] = table[:, j]
    return np.stack([cache[key(o, config.error_metric)] for o in options], axis=1)


def _uniform_rung(options, costs, budget_bits) -> LadderConfig | None:
    """The most expensive single rung (no outliers) whose exact total fits the budget."""
    best = None
    for j, (c, r) in enumerate(options):
        if r == 0 and costs[:, j].sum() <= budget_bits:
            best = c
    return best


def _flag_layers(model, tokenizer, layers, sites, config: PlanConfig, base: LadderConfig, plan: Plan, scores,
                 timer: Timer, progress: bool, cache: dict) -> list[dict]:
    """Score every layer, build the per-type profiles across blocks and flag the outlier (block, type) pairs."""
    if config.method == "sensiboost":
        base = LadderConfig.from_name(config.base) if config.base != "auto" else base
        key = ("sensitivity", base.name, config.grid, config.calib, config.calib_samples, config.calib_seqlen,
               config.seed)
        if key not in cache:
            with timer("sensitivity"):
                windows = calibration_windows(tokenizer, config.calib, config.calib_samples, config.calib_seqlen,
                                              config.seed, config.data_dir)
                cache[key] = output_sensitivity(model, layers, windows, base, config.grid, progress)
        sums = cache[key]
        for name, (s, n) in sums.items():
            scores[name]["sensitivity"] = s / max(n, 1)
        profiles = part_profiles(sites, {n: s for n, (s, _) in sums.items()}, "part",
                                 counts={n: c for n, (_, c) in sums.items()})
        kind, mode, key = "sensitivity", "ratio", "part"
    else:
        with timer("kurtosis"):
            kurt = weight_kurtosis(layers)
        for name, k in kurt.items():
            scores[name]["kurtosis"] = k
        profiles = part_profiles(sites, kurt, "module")
        kind, mode, key = "kurtosis", "difference", "module"

    flagged = []
    plan.profiles[kind] = {}
    for part, by_block in profiles.items():
        blocks = list(by_block)
        values = [by_block[b] for b in blocks]
        plan.profiles[kind][part] = values
        z = change_zscores(values, mode, config.trim)
        for i in detect_outlier_layers(values, mode, config.threshold, None, config.trim):
            flagged.append({"block": blocks[i], "part": part, "zscore": float(z[i]), "score": kind, "key": key})
        for name, site in sites.items():
            if getattr(site, key) == part and site.block in by_block:
                scores[name]["zscore"] = float(z[blocks.index(site.block)])
    flagged.sort(key=lambda f: -f["zscore"])
    return flagged if config.top_m is None else flagged[: config.top_m]


def _members(flag: dict, names, sites) -> list[int]:
    """Indices of the layers a flagged (block, type) pair covers."""
    return [i for i, name in enumerate(names)
            if sites[name].block == flag["block"] and getattr(sites[name], flag["key"]) == flag["part"]]


def _boost(flagged, names, sites, options, option_index, ladder, config: PlanConfig, costs, errors, budget_bits,
           allocated, reasons, plan: Plan):
    """Raise the flagged layers ``stop`` rungs; in exact mode re-solve the rest so the budget still holds."""
    reasons = list(reasons)
    while True:
        boosted: dict[int, int] = {}
        for f in flagged:
            for i in _members(f, names, sites):
                rung, ratio = options[allocated[i]]
                up = step_up(rung, ladder, config.stop)
                boosted[i] = option_index.get((up.name, ratio), option_index[(up.name, 0.0)])
        if not config.exact:
            choice = allocated.copy()
            for i, j in boosted.items():
                choice[i] = j
            break
        try:
            choice = solve_allocation(errors, costs, budget_bits, fixed=boosted)
            break
        except SensiquantError:
            if not flagged:
                raise
            flagged = flagged[:-1]  # the boost does not fit: drop the weakest flagged layer and retry
    plan.flagged = [{k: v for k, v in f.items() if k != "key"} for f in flagged]
    for f in flagged:
        for i in _members(f, names, sites):
            reasons[i] = (f"boosted {config.stop} rungs from {options[allocated[i]][0].name}: {f['score']} "
                          f"jump at block {f['block']} {f['part']} (z = {f['zscore']:.2f} > {config.threshold})")
    if config.exact:
        for i in range(len(names)):
            if i not in boosted and choice[i] != allocated[i]:
                reasons[i] = (f"re-allocated from {options[allocated[i]][0].name} to pay for the boost "
                              "(MXQ over the remaining budget)")
    return choice, reasons


def apply_plan(model: nn.Module, tokenizer, plan: Plan, progress: bool = True):
    """Quantize ``model`` in place as the plan says: each layer's rung and GWQ outlier share, with the plan's
    backend (the grid directly, or GPTQ on it with calibration from the plan's settings)."""
    from .gwq import GWQConfig, gwq_quantize
    from .quantize import quantize_model

    modules = dict(model.named_modules())
    missing = [layer.name for layer in plan.layers if layer.name not in modules]
    if missing:
        raise SensiquantError(f"the plan names layers this model does not have: {', '.join(missing[:3])} ...")
    config = plan.to_quant_config(skip=plan.settings.get("skip"))
    planned = {layer.name for layer in plan.layers}
    config.skip = list(config.skip) + [n for n in find_linears(model, config.skip) if n not in planned]
    if not plan.has_outliers and plan.backend != "gptq":
        report = quantize_model(model, config, progress)
    else:
        settings = plan.settings
        backend = "gptq" if plan.backend == "gptq" else plan.grid
        gwq = GWQConfig(backend=backend, saliency=plan.outlier_saliency, per_layer_ratios=True,
                        calib=settings.get("calib", "wikitext2"), calib_samples=settings.get("grad_samples", 4),
                        calib_seqlen=settings.get("grad_seqlen", 2048), seed=settings.get("seed", 0),
                        data_dir=settings.get("data_dir"))
        report, _ = gwq_quantize(model, tokenizer, config, gwq, progress)
    report.extra["plan"] = plan.summary()
    return report, config
