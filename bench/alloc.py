"""Layer-sensitive bits for a memory budget: uniform HQQ, MXQ, SensiBoost and KurtBoost (paper settings: boost on
top of the budget) and our budget-exact mode (with and without GWQ outliers), and the `quantize --budget` default.

Budgets are the exact bits/param of the uniform HQQ rungs with 8-bit scales/zeros (b2g32 below 3 bits, b3g128 =
3.13 nominal, b3g64 = 3.25, b3g32 = 3.51, b4g128 = 4.13, b4g64 = 4.25), so every plan is compared with uniform HQQ at
equal bytes. Two stages, one process each (run one benchmark at a time):

    python -m bench.alloc --stage plans   # scores, errors, all plans -> bench/results/alloc_plans/*.json
    python -m bench.alloc --stage eval    # each plan in a fresh process: quantize, WikiText-2 and C4 PPL
    python -m bench.alloc --model qwen2.5-coder-0.5b --budgets b3g128,b3g64,b4g128 --stage plans   # then eval

Another ``--model`` gets its own files (``alloc_<model>.json``, ``alloc_plans_<model>/``); ``--budgets`` limits the
rungs whose budgets are planned and measured. The SmolLM2 plans on record were made with the full error table
(every row, each rung's own fit); plans made now use ``PlanConfig``'s default, the sampled light table.

Rows: every method at every budget; the b3g32 budget also applies uniform and the +GWQ plan with GPTQ, and a
3.60 bits/param budget (the GWQ target of issue 3) applies the +GWQ plan with HQQ and with GPTQ. Both stages resume:
plans already on disk and rows already measured are kept.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from bench.common import (
    RESULTS,
    bench_parser,
    eval_args,
    peak_rss_mb,
    perplexities,
    run_all,
    run_child_if_asked,
    write_json,
)

DEFAULT_MODEL = "smollm2-135m"  # the model of the rows on record (alloc.json, alloc_plans/)
BUDGET_RUNGS = ("b2g32", "b3g128", "b3g64", "b3g32", "b4g128", "b4g64")
BEST = {"method": "sensiboost", "exact": True, "error_metric": "fisher", "outlier_ratios": (0.0, 0.005, 0.01)}
VARIANTS = {  # name: (PlanConfig overrides, budgets)
    "uniform": ({"method": "uniform"}, BUDGET_RUNGS),
    "mxq": ({"method": "mxq"}, BUDGET_RUNGS),
    "sensiboost": ({"method": "sensiboost"}, BUDGET_RUNGS),
    "kurtboost": ({"method": "kurtboost"}, BUDGET_RUNGS),
    "sensiboost exact": ({"method": "sensiboost", "exact": True}, BUDGET_RUNGS),
    "kurtboost exact": ({"method": "kurtboost", "exact": True}, BUDGET_RUNGS),
    "sensiboost exact fisher +gwq": (BEST, BUDGET_RUNGS + ("bpp3.60",)),
    # `quantize --budget` as it is now (the BEST plan without 2-bit rungs when 3-bit ones meet the budget, applied
    # with GPTQ); made and measured only where asked (--variants), the SmolLM2 rows above predate it
    "budget default": (None, BUDGET_RUNGS + ("bpp3.60",)),
}
# Budgets that are not a uniform rung: 3.60 bits/param is the GWQ target of issue 3
EXTRA_BUDGETS = {"bpp3.60": 3.60}
# The same plans applied with GPTQ (act-order, HQQ grid) instead of HQQ alone: sensiquant's best at these budgets
GPTQ_VARIANTS = {"uniform": ("b3g32",), "sensiboost exact fisher +gwq": ("b3g32", "bpp3.60")}


def _plan_path(plans: Path, rung: str, variant: str) -> Path:
    return plans / f"{rung}-{variant.replace(' ', '_').replace('+', 'plus')}.json"


def _overrides(variant: str) -> dict:
    from sensiquant.planning import BEST_METHOD

    overrides = VARIANTS[variant][0]
    return dict(BEST_METHOD) if overrides is None else overrides


def make_plans(plans: Path, out: Path, model_name: str, rungs: tuple[str, ...], variants: tuple[str, ...]) -> None:
    """Stage 1: every plan, sharing gradients, error tables and sensitivities through one cache."""
    import numpy as np

    from sensiquant.io import load_model
    from sensiquant.planning import LadderConfig, PlanCache, PlanConfig, make_plan
    from sensiquant.planning.scoring import option_costs
    from sensiquant.runtime import find_linears

    model, tok = load_model(model_name)
    layers = find_linears(model, PlanConfig().skip)
    n_params = sum(layer.weight.numel() for layer in layers.values())
    budgets = {}
    for rung in BUDGET_RUNGS:
        cost = option_costs(layers, [(LadderConfig.from_name(rung), 0.0)], "hqq")
        budgets[rung] = float(np.sum(cost)) / n_params
    budgets.update(EXTRA_BUDGETS)
    cache = PlanCache()
    # resume: plans already on disk are kept (planning is deterministic for a given seed)
    records = json.loads(out.read_text())["plans"] if out.is_file() else []
    for variant in variants:
        for rung in VARIANTS[variant][1]:
            if rung not in rungs or _plan_path(plans, rung, variant).is_file():
                continue
            start = time.perf_counter()
            plan = make_plan(model, tok, PlanConfig(budget=budgets[rung], **_overrides(variant)), progress=True,
                             model_name=model_name, cache=cache)
            plan.save(_plan_path(plans, rung, variant))
            records.append({"variant": variant, "rung": rung, "budget": budgets[rung],
                            "bits_per_param": plan.bits_per_param, "stage_seconds": plan.seconds,
                            "wall_seconds": time.perf_counter() - start, "flagged": plan.summary()["flagged"],
                            "configs": plan.config_counts()})
            print(json.dumps(records[-1]), flush=True)
            write_json(out, {"budgets": budgets, "plans": records, "peak_rss_mb": peak_rss_mb()})


def run_one(spec: dict, max_windows: int, seqlen: int) -> dict:
    """Stage 2, in a fresh process: apply one plan and measure."""
    import torch

    from sensiquant.io import load_model
    from sensiquant.methods import GPTQConfig, RoundConfig
    from sensiquant.planning import Plan, apply_plan

    torch.manual_seed(0)
    model, tok = load_model(spec.get("model", DEFAULT_MODEL))
    plan = Plan.load(spec["plan"])
    method = {"gptq": GPTQConfig(), "hqq": RoundConfig(), None: None}[spec.get("backend")]
    report, _ = apply_plan(model, tok, plan, method, progress=False)
    assert report.quantized_bits == plan.total_bits, "plan and checkpoint disagree on the bits"
    result = {"bits_per_param": report.bits_per_param, "budget": plan.budget_bits_per_param,
              "quantize_seconds": report.seconds, "n_outliers": report.n_outliers,
              "plan_seconds": sum(plan.seconds.values()), "flagged": plan.summary()["flagged"],
              "configs": plan.config_counts()}
    result.update(perplexities(model, tok, max_windows, seqlen))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = bench_parser(RESULTS / "alloc.json")
    ap.add_argument("--stage", choices=["plans", "eval"], default="eval")
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--budgets", default=",".join((*BUDGET_RUNGS, *EXTRA_BUDGETS)),
                    help="comma-separated budget rungs to plan and measure (default: all)")
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "budget default"),
                    help="comma-separated methods (default: all but 'budget default')")
    args = ap.parse_args()
    if run_child_if_asked(args, run_one):
        return
    rungs = tuple(b.strip() for b in args.budgets.split(",") if b.strip())
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    bad = [b for b in rungs if b not in (*BUDGET_RUNGS, *EXTRA_BUDGETS)] + [v for v in variants if v not in VARIANTS]
    if bad:
        ap.error(f"unknown budgets or variants: {', '.join(bad)}")
    suffix = "" if args.model == DEFAULT_MODEL else "_" + re.sub(r"[^A-Za-z0-9.-]+", "_", Path(args.model).name)
    out = RESULTS / f"alloc{suffix}.json" if Path(args.out) == RESULTS / "alloc.json" else Path(args.out)
    results = out.resolve().parent
    plans = results / f"alloc_plans{suffix}"
    if args.stage == "plans":
        plans.mkdir(parents=True, exist_ok=True)
        make_plans(plans, results / f"alloc_plans{suffix}.json", args.model, rungs, variants)
        return
    # Most telling rows first (uniform and our best two at every budget <= 3.51, then GPTQ, then the rest), so an
    # interrupted run still answers the main question.
    def row(rung, variant, backend=None):
        spec = {"plan": str(_plan_path(plans, rung, variant)), "variant": variant, "rung": rung}
        if suffix:
            spec["model"] = args.model
        if backend:
            spec.update(backend=backend, variant=f"{variant} ({backend})")
        return f"{rung} {spec['variant']}", spec

    first = ("uniform", "sensiboost exact fisher +gwq", "sensiboost exact")
    wanted = [(rung, v) for rung in (*BUDGET_RUNGS, *EXTRA_BUDGETS) for v in variants
              if rung in rungs and rung in VARIANTS[v][1]]
    configs = [row(rung, v) for rung in ("b3g64", "b3g128", "b3g32", "b2g32") for v in first if (rung, v) in wanted]
    configs += [row(rung, v, "gptq") for v, budgets in GPTQ_VARIANTS.items() for rung in budgets
                if (rung, v) in wanted]
    configs += [row(rung, v) for rung, v in wanted if row(rung, v) not in configs]
    header = {"model": args.model, "datasets": ["wikitext2 test", "c4 (local 2k validation docs)"],
              "seqlen": args.seqlen, "max_windows": args.max_windows}
    run_all("bench.alloc", configs, str(out), header, eval_args(args))


if __name__ == "__main__":
    main()
