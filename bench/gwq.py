"""GWQ benchmark on SmolLM2-135M: WikiText-2 test and C4 (seqlen 2048, first 8 windows each).

Grids (run one or more with --grid; results accumulate in bench/results/gwq.json and resume):
  core      3-bit g128, backends {rtn, hqq, gptq} x outlier ratio {0, 0.5%, 1%, 2%}, |g| saliency, 4 calib seqs
  g64       3-bit g64: gptq at 0 and 1%, rtn and hqq at 1% (their 0% rows are in the foundation benchmark), and
            gptq 1% with 8-bit scales/zeros
  saliency  3-bit g128, 1% outliers: gptq x saliencies {grad, grad_weight, fisher, hessian, activation, magnitude,
            random}; rtn x {grad, activation, magnitude, random}
  calib     3-bit g128, 1% |g| outliers, gptq, calibration {1, 16} sequences (4 is in core)
  best      GPTQ with act-order on the HQQ grid: 3-bit g128 at 1%, 3-bit g64 8-bit meta at 0 and 0.99%
            (|g| and Hessian)
  best-calib the best setting (3-bit g64 8-bit meta, 0.99% |g|, act-order HQQ grid) with 8 and 16 calibration
            sequences (gradients and GPTQ Hessians from the same windows)

    python -m bench.gwq --grid core,saliency
"""

from __future__ import annotations

from bench.common import RESULTS, bench_parser, eval_args, peak_rss_mb, perplexities, run_all, run_child_if_asked

SALIENCIES = ("grad", "grad_weight", "fisher", "hessian", "activation", "magnitude", "random")


def _cfg(bits, group, backend, ratio, saliency="grad", samples=4, quant_meta=False, act_order=False, grid="rtn"):
    """One row. The first grids ran with GPTQ on the RTN grid without act-order; the "best" grid changes both."""
    name = (f"{bits}b g{group}{' meta8' if quant_meta else ''} {backend} {saliency} "
            f"{ratio * 100:g}% n{samples}")
    if backend == "gptq" and (act_order or grid != "rtn"):
        name += f" ({grid} grid{', act-order' if act_order else ''})"
    return name, {"bits": bits, "group_size": group, "quant_meta": quant_meta, "grid": grid,
                  "gwq": {"backend": backend, "saliency": saliency, "outlier_ratio": ratio,
                          "calib_samples": samples, "act_order": act_order}}


def grids() -> dict[str, list]:
    return {
        "core": [_cfg(3, 128, b, r) for b in ("gptq", "rtn", "hqq") for r in (0.0, 0.005, 0.01, 0.02)],
        "g64": [_cfg(3, 64, "gptq", 0.0)] + [_cfg(3, 64, b, 0.01) for b in ("gptq", "rtn", "hqq")]
        + [_cfg(3, 64, "gptq", 0.01, quant_meta=True)],
        "saliency": [_cfg(3, 128, "gptq", 0.01, s) for s in SALIENCIES]
        + [_cfg(3, 128, "rtn", 0.01, s) for s in ("grad", "activation", "magnitude", "random")],
        "calib": [_cfg(3, 128, "gptq", 0.01, "grad", n) for n in (1, 16)],
        "best": [_cfg(3, 128, "gptq", 0.01, act_order=True, grid="hqq")]
        + [_cfg(3, 64, "gptq", r, s, quant_meta=True, act_order=True, grid="hqq")
           for r, s in ((0.0, "grad"), (0.0099, "grad"), (0.0099, "hessian"))],
        "best-calib": [_cfg(3, 64, "gptq", 0.0099, "grad", n, quant_meta=True, act_order=True, grid="hqq")
                       for n in (8, 16)],
    }


def run_one(spec: dict, max_windows: int, seqlen: int) -> dict:
    import torch

    from sensiquant import CalibConfig, GPTQConfig, LayerSpec, OutlierConfig, QuantConfig, RoundConfig, quantize_model
    from sensiquant.io import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    gwq = spec["gwq"]
    backend = gwq["backend"]  # rtn/hqq: round on that grid; gptq: GPTQ on the row's grid
    layer_spec = LayerSpec(grid=spec.get("grid", "rtn") if backend == "gptq" else backend, bits=spec["bits"],
                           group_size=spec["group_size"], quant_meta=spec["quant_meta"],
                           outlier_ratio=gwq["outlier_ratio"])
    method = GPTQConfig(act_order=gwq["act_order"]) if backend == "gptq" else RoundConfig()
    config = QuantConfig(method=method, default=layer_spec, outliers=OutlierConfig(saliency=gwq["saliency"]),
                         calib=CalibConfig(samples=gwq["calib_samples"]))
    report = quantize_model(model, config, tok, progress=False)
    result = {"bits_per_param": report.bits_per_param, "n_outliers": report.n_outliers,
              "gradient_seconds": report.extra.get("gradient_seconds", 0.0),
              "input_seconds": report.extra.get("input_seconds", 0.0),
              "quantize_seconds": report.extra.get("quantize_seconds", report.seconds),
              "total_quantize_seconds": report.seconds}
    result.update(perplexities(model, tok, max_windows, seqlen))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = bench_parser(RESULTS / "gwq.json")
    ap.add_argument("--grid", default="core")
    args = ap.parse_args()
    if run_child_if_asked(args, run_one):
        return
    all_grids = grids()
    configs = [c for g in args.grid.split(",") for c in all_grids[g]]
    header = {"model": "smollm2-135m", "datasets": ["wikitext2 test", "c4 (local 2k validation docs)"],
              "seqlen": args.seqlen, "max_windows": args.max_windows}
    run_all("bench.gwq", configs, args.out, header, eval_args(args))


if __name__ == "__main__":
    main()
