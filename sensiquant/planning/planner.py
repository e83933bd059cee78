"""Plans for a memory budget: uniform HQQ, MXQ, SensiBoost and KurtBoost (arXiv 2503.06518), and our
budget-exact mode with optional GWQ outliers.

* **uniform**: the one ladder rung whose exact cost fits the budget best.
* **mxq**: one rung per matrix minimising the summed reconstruction error under the budget (integer program).
* **sensiboost** / **kurtboost**: MXQ, then the layers whose sensitivity (output MSE of the block part, on
  calibration data) or weight kurtosis jumps from the layer before (trimmed z-score > threshold) go ``stop`` rungs
  up. As in the paper this costs a little more than the budget (~2%).
* **exact** (ours, for mxq/sensiboost/kurtboost): the boosted layers are pinned and MXQ re-solves the rest, so the
  least important matrices pay for the boost and the total stays within the budget to the bit. With
  ``outlier_ratios`` the options also include GWQ outliers (0.5%, 1% ...) per matrix, costed exactly in their
  ``outlier_format`` (FP16 CSR or int8 block residuals).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib import CalibConfig, GradientStats, calibration_windows, gradient_statistics, input_statistics
from ..errors import SensiquantError
from ..format.spec import OUTLIER_FORMATS
from ..methods.gptq import GPTQConfig
from ..methods.outliers import GRADIENT_SALIENCIES, OutlierConfig, saliency_scores
from ..methods.round import RoundConfig
from ..methods.signround import SignRoundConfig
from ..pipeline import DEFAULT_SKIP, QuantConfig, QuantReport, preset, quantize_model
from ..pipeline.driver import check_finite
from ..pipeline.resume import ResumeState
from ..runtime.walk import find_linears
from ..serialize import Config, coerce
from .ladder import DEFAULT_LADDER, LadderConfig, expand_ladder, step_up
from .mxq import min_bits_for, solve_allocation
from .outlier_layers import change_zscores, detect_outlier_layers
from .plan import APPLY_METHODS, Plan, PlanLayer
from .scoring import (
    LIGHT_FIT,
    LayerSite,
    Timer,
    layer_sites,
    option_costs,
    option_errors,
    option_output_errors,
    output_sensitivity,
    part_profiles,
    weight_kurtosis,
)

PLAN_METHODS = ("uniform", "mxq", "sensiboost", "kurtboost")
ERROR_FITS = ("light", "full")
# MXQ's ||W - Q||_F; "fisher": sqrt(sum g^2 (W - Q)^2), gradient-weighted; "abs_grad": sum |g| |W - Q|, the weight
# score of AutoRound's AutoScheme (here with the full-precision model's gradients). Both need a gradient pass.
# "output": the loss-weighted output error of the plan's own apply method (GPTQ's codes when it applies with GPTQ),
# from the layers' input Hessians and the gradient's row weights (scoring.option_output_errors)
ERROR_METRICS = ("frobenius", "fisher", "abs_grad", "output")
_GRADIENT_METRICS = ("fisher", "abs_grad", "output")
# What the integer program sums over matrices: each one's error as measured ("root": MXQ's Frobenius norms, the
# root of the Fisher and output metrics' squared sums), or its square ("loss": the second-order estimate of the loss
# increase, which adds up over matrices; a root sum pays a small matrix's last bits of error more than the loss does)
OBJECTIVES = ("root", "loss")
# What `sensiquant quantize --budget` uses: the best of bench/alloc.py (BENCHMARKS.md, "Layer-sensitive bits"): it
# beats uniform HQQ at every budget <= 3.51 bits/param on SmolLM2-135M, and applied with GPTQ it beats the same
# plan applied by rounding at both budgets where both were measured (3.51 and 3.60 bits/param). 2-bit rungs only
# when 3-bit ones cannot meet the budget: with them the plans lost at 3.26 and 3.60 bits on both models, by up to
# 19% PPL (BENCHMARKS.md, "Planning time and the `--budget` default").
# The integer program sums squared errors (the loss estimate) since session 17: Qwen2.5-Coder-0.5B at 3.26 bits
# 31.78 / 61.06 against 34.74 / 63.65 with root errors (and 32.27 / 62.35 for uniform GPTQ), SmolLM2 at 3.60 25.02 /
# 50.38 against 25.69 / 52.55; SmolLM2 at 3.26 lost a little (30.36 / 64.08 against 29.95 / 63.94).
BEST_METHOD = {"method": "sensiboost", "exact": True, "error_metric": "fisher", "objective": "loss",
               "outlier_ratios": (0.0, 0.005, 0.01), "apply_method": "gptq", "min_rung_bits": 3}


@dataclass(frozen=True)
class PlanConfig(Config):
    """How to make a plan. Defaults follow the SensiBoost/KurtBoost paper where it is specific (README)."""

    VERSION = 5
    method: str = "sensiboost"
    budget: float = 3.25  # bits per parameter over the quantized linears, everything counted
    exact: bool = False  # boost inside the budget (ours) instead of on top of it (paper)
    ladder: tuple[str, ...] = tuple(c.name for c in DEFAULT_LADDER)
    # rungs of fewer bits enter the plan only when the budget cannot be met without them (0: every rung, always)
    min_rung_bits: int = 0
    grid: str = "hqq"
    apply_method: str = "round"  # applying the plan: round on the grid, or "gptq" (error feedback, calibrated)
    error_metric: str = "frobenius"  # one of ERROR_METRICS
    objective: str = "root"  # one of OBJECTIVES
    outlier_ratios: tuple[float, ...] = (0.0,)  # GWQ outlier shares a matrix may take
    outlier_saliency: str = "grad"
    outlier_format: str = "csr"  # FP16 CSR (34 bits per outlier) or int8 block residuals (~18-22 bits)
    # The error table's cost (BENCHMARKS.md, "Planning time"): output rows per matrix it measures (a seeded sample;
    # None: all) and the grid fit it measures with ("light": HQQ without its second candidate, 10 iterations)
    error_rows: int | None = 128
    error_fit: str = "light"
    stop: int = 2  # rungs a flagged layer goes up (paper: 2-3)
    threshold: float = 3.0  # z-score above which a layer is an outlier layer
    top_m: int | None = 3  # keep at most this many flagged (block, type) pairs, largest z first
    trim: float = 0.05  # share trimmed from each tail for the z-score's mean and std
    base: str = "auto"  # rung for the sensitivity measurement; auto = the uniform rung of the budget
    # sensitivity windows (the paper: 128 documents of <= 512 tokens; fewer here for a CPU)
    sensitivity_calib: CalibConfig = field(default_factory=lambda: CalibConfig(samples=32, seqlen=512))
    # gradient windows, when outliers or the fisher metric need them, and GPTQ's when the plan is applied with it
    gradient_calib: CalibConfig = field(default_factory=lambda: CalibConfig(samples=4))
    skip: tuple[str, ...] = DEFAULT_SKIP

    def __post_init__(self) -> None:
        for name in ("sensitivity_calib", "gradient_calib"):
            if isinstance(getattr(self, name), dict):
                coerce(self, name, CalibConfig.from_dict(getattr(self, name)))
        for name in ("ladder", "outlier_ratios", "skip"):
            coerce(self, name, tuple(getattr(self, name)))
        coerce(self, "ladder", expand_ladder(self.ladder))
        if self.method not in PLAN_METHODS:
            raise SensiquantError(f"unknown plan method {self.method!r}: choose one of {', '.join(PLAN_METHODS)}")
        if not (isinstance(self.budget, int | float) and 0 < self.budget <= 32):
            raise SensiquantError(f"budget must be bits per parameter in (0, 32], got {self.budget!r}")
        if self.exact and self.method == "uniform":
            raise SensiquantError("the budget-exact mode needs an allocating method (mxq, sensiboost, kurtboost)")
        if self.grid not in ("hqq", "rtn") or self.apply_method not in APPLY_METHODS:
            raise SensiquantError(f"grid must be hqq or rtn and apply method one of {', '.join(APPLY_METHODS)}, "
                                  f"got {self.grid!r}, {self.apply_method!r}")
        if self.error_metric not in ERROR_METRICS:
            raise SensiquantError(f"error metric must be one of {', '.join(ERROR_METRICS)}, got {self.error_metric!r}")
        if self.objective not in OBJECTIVES:
            raise SensiquantError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.outlier_ratios or any(not 0 <= r < 0.5 for r in self.outlier_ratios):
            raise SensiquantError(f"outlier ratios must be in [0, 0.5), got {list(self.outlier_ratios)}")
        if any(r > 0 for r in self.outlier_ratios) and not self.exact:
            raise SensiquantError("GWQ outliers in a plan need the budget-exact mode (--exact)")
        if self.outlier_saliency not in GRADIENT_SALIENCIES + ("magnitude",):
            raise SensiquantError(f"plan outlier saliency must be one of grad, grad_weight, fisher, magnitude, "
                                  f"got {self.outlier_saliency!r}")
        if self.outlier_format not in OUTLIER_FORMATS:
            raise SensiquantError(f"unknown outlier format {self.outlier_format!r}: choose one of "
                                  f"{', '.join(OUTLIER_FORMATS)}")
        if self.error_rows is not None and (isinstance(self.error_rows, bool) or not isinstance(self.error_rows, int)
                                            or self.error_rows < 1):
            raise SensiquantError(f"error rows must be a positive integer or None (all rows), got {self.error_rows!r}")
        if self.error_fit not in ERROR_FITS:
            raise SensiquantError(f"error fit must be one of {', '.join(ERROR_FITS)}, got {self.error_fit!r}")
        if isinstance(self.min_rung_bits, bool) or not isinstance(self.min_rung_bits, int) or self.min_rung_bits < 0:
            raise SensiquantError(f"min rung bits must be an integer >= 0, got {self.min_rung_bits!r}")
        if self.stop < 0:
            raise SensiquantError(f"stop must be >= 0, got {self.stop}")
        if self.top_m is not None and self.top_m < 0:
            raise SensiquantError(f"top_m must be >= 0 or None, got {self.top_m}")
        self.ladder_configs()  # validates the names

    def ladder_configs(self) -> list[LadderConfig]:
        if not self.ladder:
            raise SensiquantError("the ladder is empty")
        return sorted({LadderConfig.from_name(n) for n in self.ladder}, key=lambda c: c.nominal_bits_per_param)

    @classmethod
    def _migrate(cls, data: dict[str, Any], version: int | None) -> dict[str, Any]:
        if version is None:  # plans of sensiquant-plan/1: flat calibration fields, "backend"
            seed, data_dir = data.pop("seed", 0), data.pop("data_dir", None)
            calib = data.pop("calib", "wikitext2")
            data["sensitivity_calib"] = {"source": calib, "samples": data.pop("calib_samples", 32),
                                         "seqlen": data.pop("calib_seqlen", 512), "seed": seed, "data_dir": data_dir}
            data["gradient_calib"] = {"source": calib, "samples": data.pop("grad_samples", 4),
                                      "seqlen": data.pop("grad_seqlen", 2048), "seed": seed, "data_dir": data_dir}
            data["apply_method"] = "gptq" if data.pop("backend", "hqq") == "gptq" else "round"
        if version is None or version < 3:  # made before the error table sampled rows and fitted light
            data.setdefault("error_rows", None)
            data.setdefault("error_fit", "full")
        if version is None or version < 4:  # made before rungs could be kept for budgets that need them
            data.setdefault("min_rung_bits", 0)
        return data


@dataclass(frozen=True)
class _ErrorKey:
    grid: str
    metric: str
    rung: str
    ratio: float
    saliency: str | None  # how the option's outliers are picked (options with outliers only)
    outlier_format: str | None  # how they are stored (options with outliers only)
    gradients: CalibConfig | None  # the gradient windows the metric or the outliers used
    rows: int | None  # the output rows measured per matrix (None: all)
    fit: str  # the grid fit measured with


@dataclass
class PlanCache:
    """Work that plans of one model share (e.g. several budgets): gradients per calibration, the error column of
    every (rung, outlier share, metric), sensitivities per base rung. Stage times count only work actually done."""

    gradients: dict[CalibConfig, GradientStats] = field(default_factory=dict)
    errors: dict[_ErrorKey, np.ndarray] = field(default_factory=dict)
    hessians: dict[CalibConfig, dict[str, torch.Tensor]] = field(default_factory=dict)
    sensitivity: dict[tuple[str, str, CalibConfig], dict[str, tuple[float, int]]] = field(default_factory=dict)


@dataclass
class _Problem:
    """The allocation problem: layers, options (rung, outlier share), their exact costs and errors, the budget."""

    names: list[str]
    sites: dict[str, LayerSite]
    ladder: list[LadderConfig]
    options: list[tuple[LadderConfig, float]]
    costs: np.ndarray
    budget_bits: float
    errors: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.index = {(c.name, r): j for j, (c, r) in enumerate(self.options)}

    def members(self, flag: dict) -> list[int]:
        """Indices of the layers a flagged (block, type) pair covers."""
        return [i for i, name in enumerate(self.names)
                if self.sites[name].block == flag["block"] and getattr(self.sites[name], flag["key"]) == flag["part"]]


@dataclass
class _Run:
    """One planning run: the model and its layers, the shared cache, the stage timer, progress bars."""

    model: nn.Module
    tokenizer: object
    layers: dict[str, nn.Linear]
    cache: PlanCache
    timer: Timer
    progress: bool


@dataclass
class _Flags:
    """What SensiBoost/KurtBoost found: the flagged (block, type) pairs, the profiles, per-layer scores."""

    flagged: list[dict]
    kind: str
    profiles: dict[str, list[float]]
    scores: dict[str, dict[str, float]]


def make_plan(model: nn.Module, tokenizer, config: PlanConfig, progress: bool = True, model_name: str = "",
              cache: PlanCache | None = None) -> Plan:
    """Score ``model`` and allocate a config to every quantizable linear; the model is not changed.

    ``cache`` reuses gradients, config errors and sensitivities across plans of the same model."""
    layers = find_linears(model, config.skip)
    if not layers:
        raise SensiquantError("no linear layers to plan (check the skip patterns)")
    check_finite(layers)
    run = _Run(model, tokenizer, layers, PlanCache() if cache is None else cache, Timer(), progress)
    names = list(layers)
    n_params = sum(layer.weight.numel() for layer in layers.values())
    ladder = _ladder_for_budget(layers, config, n_params)
    options = [(c, r) for c in ladder for r in sorted(set(config.outlier_ratios))
               if r == 0 or (c.bits <= 4 and c.gguf is None)]  # GGUF rungs keep no outliers
    costs = option_costs(layers, options, config.grid, config.outlier_format)
    problem = _Problem(names, layer_sites(names), ladder, options, costs, config.budget * n_params)
    cheapest = min_bits_for(problem.costs) / n_params
    if config.method != "uniform" and config.budget < cheapest:
        raise SensiquantError(f"budget {config.budget:g} bits/param is below the cheapest plan of this ladder "
                              f"({cheapest:.4f} bits/param)")
    uniform = _uniform_rung(problem)

    plan = Plan(method=config.method, budget_bits_per_param=config.budget, layers=[], exact=config.exact,
                model=model_name, grid=config.grid, apply_method=config.apply_method,
                outlier_saliency=config.outlier_saliency, outlier_format=config.outlier_format,
                settings=config.to_dict())
    choice = np.full(len(names), problem.index[(uniform.name, 0.0)] if uniform else 0, dtype=np.int64)
    reasons = [f"uniform {uniform.name}" if uniform else ""] * len(names)
    allocated = choice.copy()
    scores: dict[str, dict[str, float]] = {name: {} for name in names}

    if config.method == "uniform":
        if uniform is None:
            raise SensiquantError(f"no single rung fits {config.budget} bits/param "
                                  f"(cheapest: {ladder[0].name} at {problem.costs[:, 0].sum() / n_params:.4f})")
    else:
        gradients = _gradients(run, config)
        measured = _error_table(run, problem, config, gradients)
        problem.errors = measured**2 if config.objective == "loss" else measured
        with run.timer("allocate"):
            choice = solve_allocation(problem.errors, problem.costs, problem.budget_bits)
        allocated = choice.copy()
        reasons = ["MXQ: least total error under the budget"] * len(names)

        if config.method in ("sensiboost", "kurtboost"):
            flags = _flag_layers(run, problem, config, uniform or ladder[0])
            plan.profiles[flags.kind] = flags.profiles
            for name, values in flags.scores.items():
                scores[name].update(values)
            choice, reasons, kept = _boost(problem, flags.flagged, allocated, reasons, config)
            plan.flagged = [{k: v for k, v in f.items() if k != "key"} for f in kept]
        for i, name in enumerate(names):
            scores[name][f"error_{config.error_metric}"] = float(measured[i, choice[i]])

    sites = problem.sites
    plan.layers = [
        PlanLayer(name=name, shape=tuple(layers[name].weight.shape), config=options[choice[i]][0].name,
                  outlier_ratio=options[choice[i]][1], bits=int(problem.costs[i, choice[i]]), block=sites[name].block,
                  module=sites[name].module, part=sites[name].part, allocated=options[allocated[i]][0].name,
                  reason=reasons[i], scores=scores[name])
        for i, name in enumerate(names)]
    plan.seconds = run.timer.seconds
    return plan


def _ladder_for_budget(layers: dict[str, nn.Linear], config: PlanConfig, n_params: int) -> list[LadderConfig]:
    """The rungs this plan may use: those below ``min_rung_bits`` only if the others cannot meet the budget."""
    ladder = config.ladder_configs()
    high = [c for c in ladder if c.bits >= config.min_rung_bits]
    if not high or len(high) == len(ladder):
        return ladder
    costs = option_costs(layers, [(c, 0.0) for c in high], config.grid, config.outlier_format)
    return high if min_bits_for(costs) <= config.budget * n_params else ladder


def _gradients(run: _Run, config: PlanConfig) -> GradientStats | None:
    """The gradient statistics the metric or the outliers need (from the cache when another plan made them)."""
    if config.error_metric not in _GRADIENT_METRICS and not any(r > 0 for r in config.outlier_ratios):
        return None
    calib = config.gradient_calib
    if calib not in run.cache.gradients:
        with run.timer("gradients"):
            windows = calibration_windows(run.tokenizer, calib)
            run.cache.gradients[calib] = gradient_statistics(run.model, windows, run.layers,
                                                             getattr(torch, calib.grad_dtype), calib.checkpointing,
                                                             run.progress)
    return run.cache.gradients[calib]


def _error_table(run: _Run, problem: _Problem, config: PlanConfig, gradients: GradientStats | None) -> np.ndarray:
    """Errors of every (layer, option) under the plan's metric; columns are cached per option so that plans at
    other budgets or with more options only quantize what is new (both metrics come from one quantization).
    Options with outliers keep the top weights by the plan's outlier saliency exact."""
    grads = None if gradients is None else config.gradient_calib
    saliency = None
    if gradients is not None or config.outlier_saliency == "magnitude":
        saliency = {n: saliency_scores(config.outlier_saliency, layer.weight.detach(),
                                       grad_abs_sum=None if gradients is None else gradients.abs_sum[n],
                                       grad_sq_sum=None if gradients is None else gradients.sq_sum[n])
                    for n, layer in run.layers.items()}

    def key(option, metric):
        rung, ratio = option
        gradient_windows = grads if metric in _GRADIENT_METRICS or ratio else None
        if metric == "output":  # measured with the apply method's own codes
            metric = f"output:{config.apply_method}"
        return _ErrorKey(config.grid, metric, rung.name, ratio, config.outlier_saliency if ratio else None,
                         config.outlier_format if ratio else None, gradient_windows, config.error_rows,
                         config.error_fit)

    missing = [o for o in problem.options if key(o, config.error_metric) not in run.cache.errors]
    if missing and config.error_metric == "output":
        calib = config.gradient_calib
        if calib not in run.cache.hessians:
            with run.timer("inputs"):
                windows = calibration_windows(run.tokenizer, calib)
                run.cache.hessians[calib] = input_statistics(run.model, windows, run.layers, run.progress).hessian
        with run.timer("errors"):
            table = option_output_errors(
                run.layers, missing, config.grid, run.cache.hessians[calib], gradients.sq_sum, saliency,
                GPTQConfig() if config.apply_method == "gptq" else None, run.progress, config.outlier_format,
                config.error_rows, calib.seed, LIGHT_FIT if config.error_fit == "light" else None)
        for j, option in enumerate(missing):
            run.cache.errors[key(option, "output")] = table[:, j]
    elif missing:
        with run.timer("errors"):
            tables = option_errors(run.layers, missing, config.grid, saliency,
                                   None if gradients is None else gradients.sq_sum, run.progress,
                                   config.outlier_format, config.error_rows, config.gradient_calib.seed,
                                   LIGHT_FIT if config.error_fit == "light" else None,
                                   None if gradients is None else gradients.abs_sum)
        for metric, table in tables.items():
            for j, option in enumerate(missing):
                run.cache.errors[key(option, metric)] = table[:, j]
    return np.stack([run.cache.errors[key(o, config.error_metric)] for o in problem.options], axis=1)


def _uniform_rung(problem: _Problem) -> LadderConfig | None:
    """The most expensive single rung (no outliers) whose exact total fits the budget."""
    best = None
    for j, (c, r) in enumerate(problem.options):
        if r == 0 and problem.costs[:, j].sum() <= problem.budget_bits:
            best = c
    return best


def _flag_layers(run: _Run, problem: _Problem, config: PlanConfig, base: LadderConfig) -> _Flags:
    """Score every layer, build the per-type profiles across blocks and flag the outlier (block, type) pairs."""
    sites = problem.sites
    scores: dict[str, dict[str, float]] = {name: {} for name in problem.names}
    if config.method == "sensiboost":
        base = LadderConfig.from_name(config.base) if config.base != "auto" else base
        key = (base.name, config.grid, config.sensitivity_calib)
        if key not in run.cache.sensitivity:
            with run.timer("sensitivity"):
                windows = calibration_windows(run.tokenizer, config.sensitivity_calib)
                run.cache.sensitivity[key] = output_sensitivity(run.model, run.layers, windows, base, config.grid,
                                                                run.progress)
        sums = run.cache.sensitivity[key]
        for name, (s, n) in sums.items():
            scores[name]["sensitivity"] = s / max(n, 1)
        profiles = part_profiles(sites, {n: s for n, (s, _) in sums.items()}, "part",
                                 counts={n: c for n, (_, c) in sums.items()})
        kind, mode, key = "sensitivity", "ratio", "part"
    else:
        with run.timer("kurtosis"):
            kurt = weight_kurtosis(run.layers)
        for name, k in kurt.items():
            scores[name]["kurtosis"] = k
        profiles = part_profiles(sites, kurt, "module")
        kind, mode, key = "kurtosis", "difference", "module"

    flagged = []
    series: dict[str, list[float]] = {}
    for part, by_block in profiles.items():
        blocks = list(by_block)
        values = [by_block[b] for b in blocks]
        series[part] = values
        z = change_zscores(values, mode, config.trim)
        for i in detect_outlier_layers(values, mode, config.threshold, None, config.trim):
            flagged.append({"block": blocks[i], "part": part, "zscore": float(z[i]), "score": kind, "key": key})
        for name, site in sites.items():
            if getattr(site, key) == part and site.block in by_block:
                scores[name]["zscore"] = float(z[blocks.index(site.block)])
    flagged.sort(key=lambda f: -f["zscore"])
    return _Flags(flagged if config.top_m is None else flagged[: config.top_m], kind, series, scores)


def _boost(problem: _Problem, flagged: list[dict], allocated: np.ndarray, reasons: list[str], config: PlanConfig
           ) -> tuple[np.ndarray, list[str], list[dict]]:
    """Raise the flagged layers ``stop`` rungs; in exact mode re-solve the rest so the budget still holds, dropping
    the weakest flagged layers while the boost alone cannot fit. Returns (choice, reasons, the flags kept)."""
    reasons = list(reasons)

    def pins(flags) -> dict[int, int]:
        boosted: dict[int, int] = {}
        for f in flags:
            for i in problem.members(f):
                rung, ratio = problem.options[allocated[i]]
                up = step_up(rung, problem.ladder, config.stop)
                boosted[i] = problem.index.get((up.name, ratio), problem.index[(up.name, 0.0)])
        return boosted

    boosted = pins(flagged)
    if config.exact:
        while flagged and min_bits_for(problem.costs, boosted) > problem.budget_bits:
            flagged = flagged[:-1]
            boosted = pins(flagged)
        choice = solve_allocation(problem.errors, problem.costs, problem.budget_bits, fixed=boosted)
    else:
        choice = allocated.copy()
        for i, j in boosted.items():
            choice[i] = j
    for f in flagged:
        for i in problem.members(f):
            reasons[i] = (f"boosted {config.stop} rungs from {problem.options[allocated[i]][0].name}: {f['score']} "
                          f"jump at block {f['block']} {f['part']} (z = {f['zscore']:.2f} > {config.threshold})")
    if config.exact:
        for i in range(len(problem.names)):
            if i not in boosted and choice[i] != allocated[i]:
                reasons[i] = (f"re-allocated from {problem.options[allocated[i]][0].name} to pay for the boost "
                              "(MXQ over the remaining budget)")
    return choice, reasons, flagged


def best_tuned(config: PlanConfig) -> tuple[PlanConfig, SignRoundConfig]:
    """``--preset best`` for a plan (``quantize --budget B --preset best``): the plan made with the preset's
    calibration windows, applied on the HQQ grid (tuning from it beat tuning from GPTQ) and block-tuned as the preset
    tunes; returns the plan config and the tuning to apply it with (BENCHMARKS.md: 22.52 / 44.01 at 3.60 bits)."""
    best = preset("best")
    windows = config.gradient_calib.replace(samples=best.calib.samples)
    return config.replace(apply_method="round", gradient_calib=windows), best.tuning


def plan_quant_config(model: nn.Module, plan: Plan, method: RoundConfig | GPTQConfig | None = None,
                      tuning: SignRoundConfig | None = None) -> QuantConfig:
    """The QuantConfig that applies ``plan`` to ``model``: each planned layer's rung and outlier share, the
    plan's outlier saliency and gradient windows; ``method`` defaults to the plan's ``apply_method``; ``tuning``
    tunes the planned layers' rounding block by block (SignRound)."""
    modules = dict(model.named_modules())
    missing = [layer.name for layer in plan.layers if layer.name not in modules]
    if missing:
        raise SensiquantError(f"the plan names layers this model does not have: {', '.join(missing[:3])} ...")
    settings = PlanConfig.from_dict(plan.settings) if plan.settings else PlanConfig()
    planned = plan.specs()
    unplanned = [n for n in find_linears(model, settings.skip) if n not in planned]
    if method is None:
        method = GPTQConfig() if plan.apply_method == "gptq" else RoundConfig()
    calib = settings.gradient_calib
    return QuantConfig(method=method, overrides=planned, skip=settings.skip + tuple(unplanned),
                       outliers=OutlierConfig(saliency=plan.outlier_saliency, seed=calib.seed), calib=calib,
                       tuning=tuning)


def apply_plan(model: nn.Module, tokenizer, plan: Plan, method: RoundConfig | GPTQConfig | None = None,
               progress: bool = True, tuning: SignRoundConfig | None = None, resume: ResumeState | None = None,
               cache: PlanCache | None = None) -> tuple[QuantReport, QuantConfig]:
    """Quantize ``model`` in place as the plan says (see :func:`plan_quant_config`; ``resume`` as in
    :func:`~sensiquant.pipeline.quantize_model`); returns the report and the QuantConfig that was applied.

    ``cache``: the :class:`PlanCache` the plan was made with on this unchanged model, on the device it is applied
    on; its gradient statistics over the plan's windows (the ones the plan is applied with) save a second pass."""
    config = plan_quant_config(model, plan, method, tuning)
    gradients = None if cache is None else cache.gradients.get(config.calib)
    report = quantize_model(model, config, tokenizer, progress, resume=resume, gradients=gradients)
    report.extra["plan"] = plan.summary()
    return report, config
