"""GWQ benchmark on SmolLM2-135M: WikiText-2 test and C4 (seqlen 2048, first 8 windows each).

Grids (run one or more with --grid; results accumulate in bench/results/gwq.json and resume):
  core      3-bit g128, backends {rtn, hqq, gptq} x outlier ratio {0, 0.5%, 1%, 2%}, |g| saliency, 4 calib seqs
  g64       3-bit g64 (and g64 with 8-bit scales/zeros), backends x ratio {0, 1%}
  saliency  3-bit g128, 1% outliers, backends {rtn, gptq} x saliencies {grad, grad_weight, fisher, hessian,
            activation, magnitude, random}
  calib     3-bit g128, 1% |g| outliers, gptq, calibration {1, 16} sequences (4 is in core)

    python bench/gwq.py --grid core,saliency
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_rss_mb, run_all  # noqa: E402

HERE = Path(__file__).resolve().parent
SALIENCIES = ("grad", "grad_weight", "fisher", "hessian", "activation", "magnitude", "random")


def _cfg(bits, group, backend, ratio, saliency="grad", samples=4, quant_meta=False):
    name = (f"{bits}b g{group}{' meta8' if quant_meta else ''} {backend} {saliency} "
            f"{ratio * 100:g}% n{samples}")
    return name, {"bits": bits, "group_size": group, "quant_meta": quant_meta,
                  "gwq": {"backend": backend, "saliency": saliency, "outlier_ratio": ratio,
                          "calib_samples": samples}}


def grids() -> dict[str, list]:
    return {
        "core": [_cfg(3, 128, b, r) for b in ("gptq", "rtn", "hqq") for r in (0.0, 0.005, 0.01, 0.02)],
        "g64": [_cfg(3, 64, b, r, quant_meta=m) for m in (False, True) for b in ("gptq", "rtn", "hqq")
                for r in (0.0, 0.01)],
        "saliency": [_cfg(3, 128, b, 0.01, s) for b in ("gptq", "rtn") for s in SALIENCIES],
        "calib": [_cfg(3, 128, "gptq", 0.01, "grad", n) for n in (1, 16)],
    }


def run_one(spec: dict, max_windows: int, seqlen: int) -> dict:
    import torch

    from sensiquant.config import LayerSpec, QuantConfig
    from sensiquant.data import load_text
    from sensiquant.eval import perplexity
    from sensiquant.gwq import GWQConfig, gwq_quantize
    from sensiquant.models import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    texts = {name: load_text(name) for name in ("wikitext2", "c4")}
    layer_spec = LayerSpec(method="rtn", bits=spec["bits"], group_size=spec["group_size"],
                           quant_meta=spec["quant_meta"])
    report, stats = gwq_quantize(model, tok, QuantConfig(default=layer_spec), GWQConfig(**spec["gwq"]),
                                 progress=False)
    result = {"bits_per_param": report.bits_per_param, "n_outliers": report.n_outliers,
              "gradient_seconds": stats.gradient_seconds, "input_seconds": stats.input_seconds,
              "quantize_seconds": stats.quantize_seconds, "total_quantize_seconds": report.seconds}
    for name, text in texts.items():
        result[f"ppl_{name}"] = perplexity(model, tok, text, seqlen, max_windows, progress=False).ppl
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="core")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default=str(HERE / "results" / "gwq.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(run_one(json.loads(args.child), args.max_windows, args.seqlen)))
        return
    all_grids = grids()
    configs = [c for g in args.grid.split(",") for c in all_grids[g]]
    header = {"model": "smollm2-135m", "datasets": ["wikitext2 test", "c4 (local 2k validation docs)"],
              "seqlen": args.seqlen, "max_windows": args.max_windows}
    run_all(__file__, configs, args.out, header, ["--max-windows", str(args.max_windows), "--seqlen", str(args.seqlen)])


if __name__ == "__main__":
    main()
