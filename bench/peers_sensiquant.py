"""sensiquant itself as a peer of the harness: uniform HQQ, GPTQ, GWQ with its defaults, and a plan for a budget."""

from __future__ import annotations

import time
from pathlib import Path

from peer_api import Peer, PeerContext, PeerRun

PLANS = Path(__file__).resolve().parent / "results" / "alloc_plans"
# plans that bench/alloc.py made (budget-exact SensiBoost + Fisher + GWQ outliers) and how they are applied
PLAN_FILES = {"plan-3.60": ("bpp3.60-sensiboost_exact_fisher_plusgwq.json", "gptq"),
              "plan-4.26": ("b4g64-sensiboost_exact_fisher_plusgwq.json", "hqq")}


def _spec(setting: str):
    from sensiquant.config import LayerSpec

    bits, group = {"b4g64": (4, 64), "b4g128": (4, 128), "b3g64": (3, 64), "b3g128": (3, 128), "b2g64": (2, 64)}[
        setting.split("-")[1]]
    return LayerSpec(method="hqq", bits=bits, group_size=group, quant_meta=setting.endswith("meta8"))


def _gwq_config(ctx: PeerContext, outlier_ratio: float | None = None):
    from sensiquant.gwq import GWQConfig

    # calibration from the same WikiText-2 validation text the harness gives every peer
    samples = min(GWQConfig().calib_samples, ctx.calib_windows.shape[0])
    config = GWQConfig(calib_samples=samples, calib_seqlen=ctx.calib_windows.shape[1])
    if outlier_ratio is not None:
        config.outlier_ratio = outlier_ratio
    return config


def run(setting: str, ctx: PeerContext) -> PeerRun:
    """Settings: hqq-b4g64, hqq-b4g128-meta8, hqq-b3g64-meta8 (uniform HQQ); gptq-b3g64-meta8 (GWQ's backend alone);
    gwq (the defaults: 3-bit g64 meta8, 0.99% |g| outliers); plan-3.60 / plan-4.26 (the budget-exact SensiBoost +
    Fisher + GWQ plans that bench/alloc.py made, applied with GPTQ / HQQ; planning itself takes ~10 minutes and is
    timed in the allocation benchmark, so it is loaded here)."""
    from sensiquant.alloc.plan import Plan
    from sensiquant.config import QuantConfig
    from sensiquant.gwq import DEFAULT_SPEC, gwq_quantize
    from sensiquant.planning import apply_plan
    from sensiquant.quantize import quantize_model

    model, tokenizer = ctx.load_base()
    start = time.perf_counter()
    if setting.startswith("hqq-"):
        report = quantize_model(model, QuantConfig(default=_spec(setting)), progress=False)
    elif setting in ("gwq", "gptq-b3g64-meta8"):
        gwq = _gwq_config(ctx, 0.0 if setting.startswith("gptq") else None)
        report, _ = gwq_quantize(model, tokenizer, QuantConfig(default=DEFAULT_SPEC), gwq, progress=False)
    elif setting in PLAN_FILES:
        file, backend = PLAN_FILES[setting]
        plan = Plan.load(PLANS / file)
        plan.backend = backend
        report, _ = apply_plan(model, tokenizer, plan, progress=False)  # (report, the QuantConfig applied)
    else:
        raise ValueError(f"unknown sensiquant setting {setting!r}")
    seconds = time.perf_counter() - start
    return PeerRun(report.bits_per_param, report.quantized_params, seconds, model=model, tokenizer=tokenizer)


def _version() -> str:
    import sensiquant

    return getattr(sensiquant, "__version__", "")


PEERS = [Peer("sensiquant", ["hqq-b4g64", "hqq-b4g128-meta8", "hqq-b3g64-meta8", "gptq-b3g64-meta8", "gwq",
                             *PLAN_FILES], lambda: None, run, _version)]
