"""torchrun against one process (issue 15): the same quantize command in one process (2 threads) and under
``torchrun --standalone --nproc-per-node N`` (one thread per rank), one after the other: wall time, perplexity,
calibration loss, and the share of packed-code bytes the two checkpoints have in common.

    python -m bench.distributed [--model smollm2-135m] [--preset fast] [--nproc 2]

Rows go to ``bench/results/distributed.json``; run it alone on the machine (it times).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bench.common import RESULTS, run_json, write_json


def code_agreement(a: Path, b: Path) -> float:
    """The share of packed-code bytes (``*.qweight``) that are equal in two checkpoints."""
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    keys = sorted(k for k in x if k.endswith(".qweight"))
    same = sum(int((x[k] == y[k]).sum()) for k in keys)
    return same / sum(x[k].numel() for k in keys)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--ppl", default="wikitext2,c4")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--work-dir", default="/tmp/sensiquant-bench-distributed")
    ap.add_argument("--out", default=str(RESULTS / "distributed.json"))
    args = ap.parse_args()
    work = Path(args.work_dir)
    flags = ["quantize", args.model, "--preset", args.preset, "--no-resume", "--quiet", "--json", "--ppl", args.ppl,
             "--max-windows", str(args.max_windows)]
    runs = {"one process": ([sys.executable, "-m", "sensiquant"], {"OMP_NUM_THREADS": str(args.nproc)}),
            f"torchrun x{args.nproc}": ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc-per-node", str(args.nproc), "-m", "sensiquant"],
                                        {"OMP_NUM_THREADS": "1"})}
    rows = []
    for name, (prefix, env) in runs.items():
        out = work / name.replace(" ", "-")
        shutil.rmtree(out, ignore_errors=True)
        command = [*prefix, *flags, "--out", str(out)]
        row = {"name": name, "command": " ".join(command[1:]), **env, **run_json(command, env)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    outs = [work / name.replace(" ", "-") for name in runs]
    result = {"model": args.model, "preset": args.preset, "rows": rows}
    if all("error" not in r for r in rows):
        result["code_bytes_equal"] = code_agreement(*outs)
        result["wall_ratio"] = rows[1]["wall_seconds"] / rows[0]["wall_seconds"]
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
