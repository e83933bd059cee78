"""Zero-shot accuracy on the eight standard tasks, with standard errors: of a base model (full splits), or of a
quantized sensiquant checkpoint (``--model DIR``; its bits/param are recorded) on a fixed subset.

Log-likelihood scoring with lm-eval-harness conventions (``sensiquant.eval.zeroshot``). One task at a time; the
results file is written after each task, so an interrupted run resumes with the tasks it has not finished.

    python -m bench.zeroshot [--model NAME_OR_CHECKPOINT] [--label TEXT] [--dtype bfloat16] [--limit N]
                             [--tasks all] [--out bench/results/zeroshot.json]

Quantized models and the base they are compared with go to ``bench/results/zeroshot_quantized.json`` with the same
``--limit`` (the first N examples of every task), rendered by ``bench.report.zeroshot_quantized_table``
(one row per model).

bfloat16 is the default compute dtype here (with the output projection kept in fp32): it runs the model 1.5x faster
than fp32 on an AVX512-BF16 CPU and about 5x on one with AMX, and the full splits (5.2 M tokens one sequence per
choice, about half with shared contexts) took an hour in bf16 on 2 cores. ``--dtype float32 --limit N`` measures
what bf16 changes (a separate key in the same file).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import RESULTS, perplexities, write_json


def main() -> None:
    from sensiquant.eval.zeroshot import evaluate_zeroshot, load_task, resolve_tasks
    from sensiquant.io import load_model
    from sensiquant.runtime import float32_head

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m", help="a model name or path, or a sensiquant checkpoint")
    ap.add_argument("--label", default=None, help="the run's name in the results file (default: --model)")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--ppl-windows", type=int, default=0,
                    help="also WikiText-2 and C4 perplexity on the first N windows of 2048 tokens, in float32")
    ap.add_argument("--out", default=str(RESULTS / "zeroshot.json"))
    args = ap.parse_args()
    if args.ppl_windows < 0:
        ap.error(f"--ppl-windows must be 0 (none) or a positive number, got {args.ppl_windows}")

    tasks = resolve_tasks(args.tasks)
    for name in tasks:
        load_task(name, args.data_dir, args.limit)  # fail on a missing file before the long work
    key = f"{args.label or args.model} {args.dtype}" + (" (fp32 head)" if args.dtype != "float32" else "") + \
        (f" limit {args.limit}" if args.limit else "")
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    run = data["runs"].setdefault(key, {"label": args.label or args.model, "model": args.model, "dtype": args.dtype,
                                        "limit": args.limit,
                                        "torch_threads": torch.get_num_threads(), "tasks": {}})
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, dtype=torch.float32 if args.ppl_windows else dtype)
    report = getattr(model, "sensiquant_report", None)  # set when --model is a sensiquant checkpoint
    if report is not None:
        run["bits_per_param"] = report.bits_per_param
    if args.ppl_windows and "ppl_c4" not in run:
        run.update(perplexities(model, tokenizer, args.ppl_windows, 2048), ppl_windows=args.ppl_windows)
        write_json(path, data)
    model.to(dtype)
    float32_head(model)  # logits in fp32: bf16 logits are rounded to 0.125 steps (see sensiquant.runtime.attention)
    for name in tasks:
        if name in run["tasks"]:
            print(f"{name}: done before, skipped", flush=True)
            continue
        start = time.perf_counter()
        result = evaluate_zeroshot(model, tokenizer, [name], limit=args.limit, data_dir=args.data_dir,
                                   batch_tokens=args.batch_tokens)[name]
        row = result.to_dict()
        row["seconds"] = time.perf_counter() - start
        row["per_example"] = result.per_example  # for paired comparisons between runs
        run["tasks"][name] = row
        run["total_seconds"] = sum(r["seconds"] for r in run["tasks"].values())
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
        print(json.dumps({k: v for k, v in row.items() if k != "per_example"}), flush=True)


if __name__ == "__main__":
    main()
