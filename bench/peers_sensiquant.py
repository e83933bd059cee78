"""sensiquant itself as a peer of the harness: uniform HQQ, GPTQ, GWQ with its defaults, and a plan for a budget."""

from __future__ import annotations

import time

from bench.common import RESULTS
from bench.peer_api import Peer, PeerContext, PeerRun

PLANS = RESULTS / "alloc_plans"
# plans that bench/alloc.py made (budget-exact SensiBoost + Fisher + GWQ outliers) and how they are applied
PLAN_FILES = {"plan-3.60": ("bpp3.60-sensiboost_exact_fisher_plusgwq.json", "gptq"),
              "plan-4.26": ("b4g64-sensiboost_exact_fisher_plusgwq.json", "hqq")}


def _spec(setting: str):
    from sensiquant import LayerSpec

    bits, group = {"b4g64": (4, 64), "b4g128": (4, 128), "b3g64": (3, 64), "b3g128": (3, 128), "b2g64": (2, 64)}[
        setting.split("-")[1]]
    return LayerSpec(grid="hqq", bits=bits, group_size=group, quant_meta=setting.endswith("meta8"))


def _recipe(name: str, ctx: PeerContext):
    """The recipe with calibration from the same WikiText-2 validation text the harness gives every peer."""
    from sensiquant import recipe

    config = recipe(name)
    samples = min(config.calib.samples, ctx.calib_windows.shape[0])
    return config.replace(calib=config.calib.replace(samples=samples, seqlen=ctx.calib_windows.shape[1]))


def run(setting: str, ctx: PeerContext) -> PeerRun:
    """Settings: hqq-b4g64, hqq-b4g128-meta8, hqq-b3g64-meta8 (uniform HQQ); gptq-b3g64-meta8 (GWQ's backend alone);
    gwq (the defaults: 3-bit g64 meta8, 1.9% |g| block outliers; 0.99% FP16 ones before session 6); plan-3.60 /
    plan-4.26 (the budget-exact SensiBoost + Fisher + GWQ plans that bench/alloc.py made, applied with GPTQ / HQQ;
    planning itself takes ~10 minutes and is timed in the allocation benchmark, so it is loaded here)."""
    from sensiquant import GPTQConfig, Plan, QuantConfig, RoundConfig, apply_plan, quantize_model

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
    else:
        raise ValueError(f"unknown sensiquant setting {setting!r}")
    seconds = time.perf_counter() - start
    return PeerRun(report.bits_per_param, report.quantized_params, seconds, model=model, tokenizer=tokenizer)


def _version() -> str:
    import sensiquant

    return getattr(sensiquant, "__version__", "")


PEERS = [Peer("sensiquant", ["hqq-b4g64", "hqq-b4g128-meta8", "hqq-b3g64-meta8", "gptq-b3g64-meta8", "gwq",
                             *PLAN_FILES], lambda: None, run, _version)]
