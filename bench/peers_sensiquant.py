"""sensiquant itself as a peer of the harness: uniform HQQ, GPTQ, GWQ with its defaults, and plans for a budget."""

from __future__ import annotations

import time

from bench.common import RESULTS
from bench.peer_api import Peer, PeerContext, PeerRun

PLANS = RESULTS / "alloc_plans"
# plans that bench/alloc.py made (budget-exact SensiBoost + Fisher + GWQ outliers) and how they are applied
PLAN_FILES = {"plan-3.60": ("bpp3.60-sensiboost_exact_fisher_plusgwq.json", "gptq"),
              "plan-4.26": ("b4g64-sensiboost_exact_fisher_plusgwq.json", "hqq")}


# `quantize --budget B` (budget-B) and `quantize --budget B --preset best` (best-B), planned and applied in the row's
# process (planning time included): the curve from 2.5 to 4.5 bits/param of issue 14
BUDGETS = ("2.60", "3.00", "3.26", "3.60", "4.00", "4.50")
BUDGET_SETTINGS = tuple(f"{kind}-{b}" for kind in ("budget", "best") for b in BUDGETS)


def _spec(setting: str):
    from sensiquant import LayerSpec

    bits, group = {"b4g64": (4, 64), "b4g128": (4, 128), "b3g64": (3, 64), "b3g128": (3, 128), "b2g64": (2, 64)}[
        setting.split("-")[1]]
    return LayerSpec(grid="hqq", bits=bits, group_size=group, quant_meta=setting.endswith("meta8"))


def _harness_calib(calib, ctx: PeerContext):
    """``calib`` limited to the harness's number of calibration windows, at its window length."""
    return calib.replace(samples=min(calib.samples, ctx.calib_windows.shape[0]), seqlen=ctx.calib_windows.shape[1])


def _recipe(name: str, ctx: PeerContext):
    """The recipe with calibration from the same WikiText-2 validation text the harness gives every peer."""
    from sensiquant import recipe

    config = recipe(name)
    return config.replace(calib=_harness_calib(config.calib, ctx))


def _budget_config(setting: str, ctx: PeerContext):
    """The PlanConfig (and block tuning, for best-B) that `quantize --budget B [--preset best]` uses, with at most
    the harness's number of calibration windows, of its length."""
    from sensiquant.planning import BEST_METHOD, PlanConfig, best_tuned

    kind, budget = setting.split("-")
    config, tuning = PlanConfig(budget=float(budget), **BEST_METHOD), None
    if kind == "best":
        config, tuning = best_tuned(config)
    return config.replace(gradient_calib=_harness_calib(config.gradient_calib, ctx)), tuning


def run(setting: str, ctx: PeerContext) -> PeerRun:
    """Settings: hqq-b4g64, hqq-b4g128-meta8, hqq-b3g64-meta8 (uniform HQQ); gptq-b3g64-meta8 (GWQ's backend alone);
    gwq (the defaults: 3-bit g64 meta8, 1.9% |g| block outliers; 0.99% FP16 ones before session 6); plan-3.60 /
    plan-4.26 (the budget-exact SensiBoost + Fisher + GWQ plans that bench/alloc.py made, applied with GPTQ / HQQ;
    planning itself takes ~10 minutes and is timed in the allocation benchmark, so it is loaded here); budget-B and
    best-B for B in BUDGETS (`quantize --budget B`, `--preset best` for best-B: planned here, planning timed)."""
    from sensiquant import GPTQConfig, Plan, QuantConfig, RoundConfig, apply_plan, quantize_model
    from sensiquant.planning import PlanCache, make_plan

    model, tokenizer = ctx.load_base()
    start = time.perf_counter()
    if setting.startswith("hqq-"):
        report = quantize_model(model, QuantConfig(default=_spec(setting)), progress=False)
    elif setting in ("gwq", "gptq-b3g64-meta8"):
        report = quantize_model(model, _recipe(setting.split("-")[0], ctx), tokenizer, progress=False)
    elif setting in PLAN_FILES:
        file, method = PLAN_FILES[setting]
        method = GPTQConfig() if method == "gptq" else RoundConfig()
        report, _ = apply_plan(model, tokenizer, Plan.load(PLANS / file), method, progress=False)
    elif setting in BUDGET_SETTINGS:
        config, tuning = _budget_config(setting, ctx)
        cache = PlanCache()  # the plan's gradient pass serves the quantization too, as in quantize --budget
        plan = make_plan(model, tokenizer, config, progress=False, model_name=ctx.model_name, cache=cache)
        report, _ = apply_plan(model, tokenizer, plan, None, progress=False, tuning=tuning, cache=cache)
    else:
        raise ValueError(f"unknown sensiquant setting {setting!r}")
    seconds = time.perf_counter() - start
    return PeerRun(report.bits_per_param, report.quantized_params, seconds, model=model, tokenizer=tokenizer)


def _version() -> str:
    import sensiquant

    return getattr(sensiquant, "__version__", "")


PEERS = [Peer("sensiquant", ["hqq-b4g64", "hqq-b4g128-meta8", "hqq-b3g64-meta8", "gptq-b3g64-meta8", "gwq",
                             *PLAN_FILES, *BUDGET_SETTINGS],
                lambda: None, run, _version)]
