"""Our HQQ against the `hqq` package on every linear layer of SmolLM2-135M, at the same settings.

Same settings = the package's solver as it ships (lp 0.7, beta 10, kappa 1.01, 20 iterations, early stop, axis 1,
fractional zero, scale fixed at min-max) and ours with ``round_zero=False, optimize_scale=False, l2_guard=False``.
Also reports sensiquant's default HQQ. Reconstruction error summed over all layers: squared (Frobenius^2) and
absolute (the L1 the solver's early stop watches).

    python -m bench.hqq_parity [--out bench/results/hqq_parity.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import RESULTS, write_json


def package_dequant(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    from hqq.core.quantize import Quantizer

    w_q, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=group_size, optimize=True,
                                   round_zero=False, axis=1, bitpack=False, compute_dtype=torch.float32,
                                   device="cpu")
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(w_q, meta).reshape(w.shape).float()


def main() -> None:
    from sensiquant.format import HQQParams, LayerSpec
    from sensiquant.io import load_model
    from sensiquant.methods import quantize_weight
    from sensiquant.runtime import find_linears

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS / "hqq_parity.json"))
    args = ap.parse_args()
    model, _ = load_model("smollm2-135m")
    linears = find_linears(model, ["lm_head"])
    results = []
    for bits, group in ((4, 64), (3, 64)):
        same = LayerSpec(grid="hqq", bits=bits, group_size=group, round_zero=False,
                         hqq=HQQParams(optimize_scale=False, l2_guard=False))
        default = LayerSpec(grid="hqq", bits=bits, group_size=group)
        rtn = LayerSpec(grid="rtn", bits=bits, group_size=group)
        sums = {k: {"sq": 0.0, "abs": 0.0, "seconds": 0.0} for k in ("package", "ours_same", "ours_default", "rtn")}
        worst = 0.0
        for w in (lin.weight.detach().float() for lin in linears.values()):
            errs = {}
            for key, spec in (("package", None), ("ours_same", same), ("ours_default", default), ("rtn", rtn)):
                t = time.perf_counter()
                deq = package_dequant(w, bits, group) if spec is None else quantize_weight(w, spec).dequantize()
                e = deq - w
                sums[key]["seconds"] += time.perf_counter() - t
                sums[key]["sq"] += float(e.pow(2).sum())
                sums[key]["abs"] += float(e.abs().sum())
                errs[key] = float(e.pow(2).sum())
            worst = max(worst, errs["ours_same"] / errs["package"])
        row = {"bits": bits, "group_size": group, "n_layers": len(linears), **sums,
               "ratio_sq_ours_same_to_package": sums["ours_same"]["sq"] / sums["package"]["sq"],
               "ratio_abs_ours_same_to_package": sums["ours_same"]["abs"] / sums["package"]["abs"],
               "worst_layer_ratio_sq": worst}
        print(json.dumps(row), flush=True)
        results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), {"model": "smollm2-135m", "rows": results})


if __name__ == "__main__":
    main()
