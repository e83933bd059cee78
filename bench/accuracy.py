"""Accuracy per byte (issue 14): block tuning (SignRound) x start (round to nearest, GPTQ, GPTAQ) x outlier encoding
(CSR, block) x grid, on SmolLM2-135M and Qwen2.5-Coder-0.5B. WikiText-2 test and C4, first 8 windows of 2048 tokens.

Every row is a whole :class:`sensiquant.QuantConfig` (its JSON is stored with the result), run in a fresh process;
results accumulate in bench/results/accuracy.json and resume.

    python -m bench.accuracy --grid tuning            # SmolLM2 ablation rows
    python -m bench.accuracy --grid tuning --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

from bench.common import RESULTS, bench_parser, eval_args, peak_rss_mb, perplexities, run_all, run_child_if_asked


def _row(name: str, bits: int, group: int, method: str = "round", ratio: float = 0.0, fmt: str = "csr",
         tune: dict | None = None, samples: int = 4, quant_meta: bool = True, grid: str = "hqq") -> tuple[str, dict]:
    from sensiquant import CalibConfig, GPTAQConfig, GPTQConfig, LayerSpec, QuantConfig, RoundConfig, SignRoundConfig

    spec = LayerSpec(grid=grid, bits=bits, group_size=group, quant_meta=quant_meta, outlier_ratio=ratio,
                     outlier_format=fmt)
    methods = {"gptq": GPTQConfig, "gptaq": GPTAQConfig, "round": RoundConfig}
    name_method = method.split(":")
    kwargs = {"alpha": float(name_method[1])} if len(name_method) > 1 else {}
    config = QuantConfig(method=methods[name_method[0]](**kwargs), default=spec,
                         calib=CalibConfig(samples=samples),
                         tuning=None if tune is None else SignRoundConfig(**tune))
    return name, config.to_dict()


def grids() -> dict[str, list]:
    bf16 = {"compute_dtype": "bfloat16"}
    light = {}  # SignRound defaults: AutoRound's light recipe
    return {
        # 3-bit g128 with 8-bit metadata (3.14 bits/param): the size of AutoRound's W3 g128 (3.16)
        "tuning": [
            _row("3b g128 meta8 hqq rtn", 3, 128),
            _row("3b g128 meta8 hqq rtn + signround50", 3, 128, tune=light),
            _row("3b g128 meta8 gptq", 3, 128, "gptq"),
            _row("3b g128 meta8 gptq + signround50", 3, 128, "gptq", tune=light),
            _row("3b g128 meta8 gptq + signround50 bf16", 3, 128, "gptq", tune={"compute_dtype": "bfloat16"}),
            _row("3b g128 meta8 hqq rtn + signround50 bf16", 3, 128, tune=bf16),
        ],
        # 3.6 bits: GWQ (CSR 0.99%) against block outliers at the same bytes (1.9%), tuned or not
        "outliers": [
            _row("3b g64 meta8 gptq grad 0.99% csr n16", 3, 64, "gptq", 0.0099, samples=16),
            _row("3b g64 meta8 gptq grad 1.9% block n16", 3, 64, "gptq", 0.019, "block", samples=16),
            _row("3b g64 meta8 hqq rtn grad 1.9% block + signround50 bf16 n16", 3, 64, "round", 0.019, "block",
                 bf16, samples=16),
        ],
        # GPTAQ (asymmetric calibration) against GPTQ, untuned and as the start of tuning. Two earlier rows,
        # "full shift", solved GPTQ toward the least-squares target W + alpha W C H^-1 instead (since replaced)
        "gptaq": [
            _row("3b g128 meta8 gptaq a0.25", 3, 128, "gptaq"),
            _row("3b g128 meta8 gptaq a1", 3, 128, "gptaq:1.0"),
            _row("3b g64 meta8 gptaq grad 1.9% block n16", 3, 64, "gptaq", 0.019, "block", samples=16),
            _row("3b g128 meta8 gptaq + signround50 bf16", 3, 128, "gptaq", tune=bf16),
        ],
        # AutoRound's own step size: lr = 1/iters (0.02 at 50 steps) when none is given, as in the peer run;
        # these rows and all later ones also keep the best step (AutoRound does too)
        "lr": [
            _row("3b g128 meta8 hqq rtn + signround50 bf16 lr0.02 best-step", 3, 128,
                 tune={"compute_dtype": "bfloat16", "lr": 0.02}),
            _row("3b g128 meta8 hqq rtn + signround50 bf16 best-step", 3, 128, tune=bf16),
            _row("3b g128 meta8 hqq rtn + signround50 bf16 lr0.02 best-step n16", 3, 128,
                 tune={"compute_dtype": "bfloat16", "lr": 0.02}, samples=16),
        ],
        # the second model (python -m bench.accuracy --grid qwen --model qwen2.5-coder-0.5b): GWQ untuned and the
        # best preset's recipe, on 8 calibration windows (16 take about 75 minutes tuned on 2 cores)
        "qwen": [
            _row("3b g64 meta8 gptq grad 1.9% block n8", 3, 64, "gptq", 0.019, "block", samples=8),
            _row("3b g64 meta8 hqq rtn grad 1.9% block + signround50 bf16 n8", 3, 64, "round", 0.019, "block",
                 bf16, samples=8),
            _row("3b g64 meta8 hqq rtn grad 1.9% block + signround50 bf16 lr0.02 n8", 3, 64, "round", 0.019,
                 "block", {"compute_dtype": "bfloat16", "lr": 0.02}, samples=8),
        ],
        # the ends of the curve: 2.6 and 4.0 bits/param
        "ends": [
            _row("2b g64 meta8 hqq rtn grad 1.9% block + signround50 bf16 n16", 2, 64, "round", 0.019, "block",
                 bf16, samples=16),
            _row("3b g64 meta8 hqq rtn grad 4.3% block + signround50 bf16 n16", 3, 64, "round", 0.043, "block",
                 bf16, samples=16),
            _row("3b g64 meta8 hqq rtn grad 4.3% block + signround50 bf16 lr0.02 n16", 3, 64, "round", 0.043,
                 "block", {"compute_dtype": "bfloat16", "lr": 0.02}, samples=16),
        ],
    }


def run_one(config_dict: dict, max_windows: int, seqlen: int, model_name: str = "smollm2-135m") -> dict:
    import torch

    from sensiquant import QuantConfig, quantize_model
    from sensiquant.io import load_model

    torch.manual_seed(0)
    model_name = config_dict.pop("model", model_name)
    model, tok = load_model(model_name)
    config = QuantConfig.from_dict(config_dict)
    report = quantize_model(model, config, tok, progress=False)
    result = {"model": model_name, "bits_per_param": report.bits_per_param, "n_outliers": report.n_outliers,
              "gradient_seconds": report.extra.get("gradient_seconds", 0.0),
              "quantize_seconds": report.seconds}
    if "tuning_loss" in report.extra:
        losses = list(report.extra["tuning_loss"].values())
        result["tuning_loss_start_end"] = [sum(a for a, _ in losses), sum(b for _, b in losses)]
    result.update(perplexities(model, tok, max_windows, seqlen))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = bench_parser(RESULTS / "accuracy.json")
    ap.add_argument("--grid", default="tuning")
    ap.add_argument("--model", default="smollm2-135m")
    args = ap.parse_args()
    if run_child_if_asked(args, run_one):
        return
    all_grids = grids()
    configs = [(f"{args.model}: {name}", {**spec, "model": args.model})
               for g in args.grid.split(",") for name, spec in all_grids[g]]
    header = {"datasets": ["wikitext2 test", "c4 (local 2k validation docs)"], "seqlen": args.seqlen,
              "max_windows": args.max_windows}
    run_all("bench.accuracy", configs, args.out, header, eval_args(args))


if __name__ == "__main__":
    main()
