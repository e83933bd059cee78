"""What `sensiquant quantize --budget` costs and buys: planning time by stage, then the plan applied with GPTQ and
scored, beside uniform GWQ at the same size (issue 14: planning within 5 minutes; a plan never worse than the best
uniform setting of its size).

    python -m bench.plan_budget [--model smollm2-135m] [--rows NAME,NAME] [--out bench/results/plan_budget.json]

Each row runs in a fresh process, one at a time (the times are the point): a plan row loads the model, makes the
plan (``PlanConfig`` = the ``--budget`` default with the row's overrides), applies it (with GPTQ unless the row
says otherwise; block-tuned where it says so), reusing the plan's gradient pass as `quantize --budget` does, and
scores WikiText-2 and C4; a ``recipe`` row quantizes a uniform
recipe (GWQ, GPTQ) with the row's calibration windows. Rows already in the results file are kept (delete it to
redo them).
"""

from __future__ import annotations

import time

from bench.common import RESULTS, bench_parser, eval_args, peak_rss_mb, perplexities, run_all, run_child_if_asked

ROWS = {  # name: spec ("plan": PlanConfig overrides of the --budget default, "preset": "best" to tune it as
    # `--budget --preset best` does; "recipe": a uniform recipe and its CalibConfig). "with 2-bit rungs": the
    # default before session 16 (min_rung_bits 0: every rung, always)
    "plan 3.60": {"budget": 3.60, "plan": {}},
    "plan 3.60 with 2-bit rungs": {"budget": 3.60, "plan": {"min_rung_bits": 0}},
    "plan 3.60 full error table": {"budget": 3.60, "plan": {"error_rows": None, "error_fit": "full"}},
    "plan 3.60 full error table with 2-bit rungs": {"budget": 3.60, "plan": {"error_rows": None, "error_fit": "full",
                                                                             "min_rung_bits": 0}},
    "plan 3.60 block outliers 0/1/2% with 2-bit rungs": {"budget": 3.60, "plan": {
        "outlier_format": "block", "outlier_ratios": [0.0, 0.01, 0.02], "min_rung_bits": 0}},
    "gwq 4 windows": {"recipe": "gwq", "calib": {"samples": 4}},
    "plan 3.26": {"budget": 3.2578, "plan": {}},
    "plan 3.26 with 2-bit rungs": {"budget": 3.2578, "plan": {"min_rung_bits": 0}},
    "plan 3.26 full error table": {"budget": 3.2578, "plan": {"error_rows": None, "error_fit": "full"}},
    "gptq 4 windows": {"recipe": "gptq", "calib": {"samples": 4}},
    "gptq 16 windows": {"recipe": "gptq", "calib": {"samples": 16}},
    # errors scored as AutoRound's AutoScheme scores them, sum |g| |W - Q(W)|, instead of Fisher-weighted
    "plan 3.60 abs_grad": {"budget": 3.60, "plan": {"error_metric": "abs_grad"}},
    "plan 3.26 abs_grad": {"budget": 3.2578, "plan": {"error_metric": "abs_grad"}},
    # errors as the applied plan will make them: GPTQ's codes on the sampled rows, scored by the K-FAC output error
    "plan 3.60 output": {"budget": 3.60, "plan": {"error_metric": "output"}},
    "plan 3.26 output": {"budget": 3.2578, "plan": {"error_metric": "output"}},
    # the integer program summing squared errors (the second-order loss estimate) instead of root errors: the
    # `--budget` default since session 17
    "plan 3.26 loss": {"budget": 3.2578, "plan": {"objective": "loss"}},
    "plan 3.60 loss": {"budget": 3.60, "plan": {"objective": "loss"}},
    # `quantize --budget 3.6 --preset best` (planning.best_tuned: the HQQ grid, block-tuned, 16 windows); the row on
    # record ran it spelled out (apply_method round, 16 gradient windows, SignRound bf16): the same settings
    "plan 3.60 tuned n16": {"budget": 3.60, "plan": {}, "preset": "best"},
    "plan 4.00 tuned n16": {"budget": 4.0, "plan": {}, "preset": "best"},
    # the --budget default with 16 gradient windows instead of 4 (the Fisher table and GPTQ's Hessians both): is
    # the table's noise what makes the Qwen plan lose to uniform GPTQ? ("gptq 16 windows" is its uniform peer)
    "plan 3.26 grad n16": {"budget": 3.2578, "plan": {}, "grad_windows": 16},
}


# Every plan row but the "loss" ones ran before the default became the loss objective (session 17): they keep the
# root objective they were measured with
for _name, _spec in ROWS.items():
    if "plan" in _spec and "loss" not in _name:
        _spec["plan"].setdefault("objective", "root")


def run_one(spec: dict, max_windows: int, seqlen: int) -> dict:
    """One row in this process: plan + apply (or uniform GWQ), perplexities, times, peak RSS."""
    from sensiquant import CalibConfig, quantize_model, recipe
    from sensiquant.io import load_model
    from sensiquant.planning import BEST_METHOD, PlanCache, PlanConfig, apply_plan, best_tuned, make_plan

    start = time.perf_counter()
    model, tok = load_model(spec["model"])
    result: dict = {"load_seconds": time.perf_counter() - start}
    if "recipe" in spec:
        config = recipe(spec["recipe"], calib=CalibConfig(**spec["calib"]))
        t = time.perf_counter()
        report = quantize_model(model, config, tok, progress=False)
        result["quantize_seconds"] = time.perf_counter() - t
    else:
        plan_config = PlanConfig(**{**BEST_METHOD, "budget": spec["budget"], **spec["plan"]})
        if "grad_windows" in spec:
            plan_config = plan_config.replace(
                gradient_calib=plan_config.gradient_calib.replace(samples=spec["grad_windows"]))
        tuning = None
        if spec.get("preset") == "best":
            plan_config, tuning = best_tuned(plan_config)
        cache = PlanCache()
        t = time.perf_counter()
        plan = make_plan(model, tok, plan_config, progress=False, model_name=spec["model"], cache=cache)
        result["plan_seconds"] = time.perf_counter() - t
        result["plan_stage_seconds"] = plan.seconds
        result["plan_layers"] = {layer.name: [layer.config, layer.outlier_ratio] for layer in plan.layers}
        t = time.perf_counter()
        report, _ = apply_plan(model, tok, plan, progress=False, cache=cache, tuning=tuning)
        result["quantize_seconds"] = time.perf_counter() - t
    result["bits_per_param"] = report.bits_per_param
    result["n_outliers"] = report.n_outliers
    t = time.perf_counter()
    result.update(perplexities(model, tok, max_windows, seqlen))
    result["eval_seconds"] = time.perf_counter() - t
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = bench_parser(RESULTS / "plan_budget.json")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all)")
    args = ap.parse_args()
    if run_child_if_asked(args, run_one):
        return
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        ap.error(f"unknown rows: {', '.join(unknown)}")
    configs = [(f"{args.model}: {n}", {"model": args.model, **ROWS[n]}) for n in names]
    header = {"max_windows": args.max_windows, "seqlen": args.seqlen}
    run_all("bench.plan_budget", configs, args.out, header, eval_args(args))


if __name__ == "__main__":
    main()
