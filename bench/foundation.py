"""Foundation benchmark: SmolLM2-135M, WikiText-2 test, seqlen 2048, first 8 windows.

Base model; RTN and HQQ at 4-bit g64/g128 and 3-bit g64/g128 (sensiquant defaults: integer zero points, HQQ with
scale update and L2 guard); plus the hqq package at its defaults and our HQQ at the package's settings, to show
why the package loses to RTN at 3 bits. Each configuration runs in its own process so peak RSS is its own.

    python -m bench.foundation [--max-windows 8] [--out bench/results/foundation.json]
"""

from __future__ import annotations

import time

from bench.common import RESULTS, bench_parser, eval_args, peak_rss_mb, run_all, run_child_if_asked

CONFIGS = [("base", None)] + [
    (f"{m} {b}-bit g{g}", {"grid": m, "bits": b, "group_size": g})
    for b in (4, 3) for g in (64, 128) for m in ("rtn", "hqq")
] + [
    (f"hqq (package settings: fractional zero) {b}-bit g64",
     {"grid": "hqq", "bits": b, "group_size": 64, "round_zero": False,
      "hqq": {"optimize_scale": False, "l2_guard": False}})
    for b in (4, 3)
] + [(f"hqq package 0.2.8 defaults {b}-bit g64", {"package": True, "bits": b, "group_size": 64}) for b in (4, 3)]


def run_one(spec: dict | None, max_windows: int, seqlen: int) -> dict:
    """Runs inside a fresh process: load, quantize, evaluate."""
    import torch

    from sensiquant import LayerSpec, QuantConfig, evaluate_perplexity, quantize_model
    from sensiquant.io import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    result: dict = {"bits_per_param": 16.0 if spec is None else None, "quantize_seconds": 0.0}
    if spec is not None and spec.get("package"):
        result.update(_package_quantize(model, spec["bits"], spec["group_size"]))
    elif spec is not None:
        report = quantize_model(model, QuantConfig(default=LayerSpec.from_dict(spec)), progress=False)
        result["bits_per_param"] = report.bits_per_param
        result["quantize_seconds"] = report.seconds
    r = evaluate_perplexity(model, tok, ["wikitext2"], seqlen, max_windows, progress=False)["wikitext2"]
    result.update(ppl=r.ppl, eval_seconds=r.seconds, n_windows=r.n_windows,
                  peak_rss_mb=peak_rss_mb())
    return result


def _package_quantize(model, bits: int, group_size: int) -> dict:
    """The hqq package at its recommended defaults (BaseQuantizeConfig), weights replaced by its dequantization."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from sensiquant.runtime import find_linears

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size)
    start = time.perf_counter()
    n_params = n_bits = 0
    for linear in find_linears(model, ["lm_head"]).values():
        hq = HQQLinear(linear, cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        with torch.no_grad():
            linear.weight.copy_(hq.dequantize().reshape(linear.weight.shape).float())
        n_params += linear.weight.numel()
        n_bits += linear.weight.numel() * bits + 2 * 16 * hq.meta["scale"].numel()
    return {"quantize_seconds": time.perf_counter() - start, "bits_per_param": n_bits / n_params}


def main() -> None:
    ap = bench_parser(RESULTS / "foundation.json")
    ap.add_argument("--only", default=None, help="run only configs whose name contains this")
    ap.add_argument("--fresh", action="store_true", help="ignore results already in --out")
    args = ap.parse_args()
    if run_child_if_asked(args, run_one):
        return
    configs = [(n, s) for n, s in CONFIGS if not args.only or args.only in n]
    header = {"model": "smollm2-135m", "dataset": "wikitext2 test", "seqlen": args.seqlen,
              "max_windows": args.max_windows}
    run_all("bench.foundation", configs, args.out, header, eval_args(args),
            resume=not args.fresh)


if __name__ == "__main__":
    main()
