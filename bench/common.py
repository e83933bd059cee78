"""Shared benchmark plumbing. Benchmarks are modules of the ``bench`` package, run from the repository root
(``python -m bench.alloc``). Every configuration runs in a fresh process (so peak RSS is its own) and results are
appended to a JSON file as they come, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sensiquant.runtime.speed import peak_rss_mb  # noqa: F401  (the one peak-RSS measure, for the benches)
from sensiquant.serialize import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (from the repository root; ``env`` added to this process's environment) and return the JSON
    object it prints last, or the error it died with."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return {"error": lines[-1]}
    out = proc.stdout.strip()
    try:
        result = json.loads(out.splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        result = json.loads(out[out.index("{"):])  # an indented JSON document (``sensiquant ... --json``)
    return {**result, "wall_seconds": time.perf_counter() - start}


def run_child(module: str, child_args: list[str], extra_args: list[str], python: str | None = None) -> dict:
    """``python -m MODULE --child ARGS... EXTRA...`` in a fresh process (``python``: another interpreter, e.g. a
    peer's own virtual environment); its last JSON line (or its error)."""
    return run_json([python or sys.executable, "-m", module, "--child", *child_args, *extra_args])


def run_all(module: str, configs: list[tuple[str, dict | None]], out: str, header: dict, extra_args: list[str],
            resume: bool = True) -> list[dict]:
    """Run every (name, spec) not already in ``out`` (when resuming), writing the file after each one."""
    path = Path(out)
    rows = json.loads(path.read_text())["rows"] if resume and path.is_file() else []
    done = {r["name"] for r in rows if "error" not in r}
    rows = [r for r in rows if r["name"] in done]
    for name, spec in configs:
        if name in done:
            continue
        rows.append({"name": name, "spec": spec, **run_child(module, [json.dumps(spec)], extra_args)})
        print(json.dumps(rows[-1]), flush=True)
        write_json(path, {**header, "rows": rows})
    return rows


def write_json(path: Path, data: dict) -> None:
    """Write a results file whole (a temporary sibling renamed over the old one)."""
    write_text_atomic(path, json.dumps(data, indent=2))


def bench_parser(default_out: Path) -> argparse.ArgumentParser:
    """The options every benchmark takes: windows, window length, results file, and the hidden child hook."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def run_child_if_asked(args, run_one) -> bool:
    """In a child process: run the one configuration, print its result as JSON, and say so."""
    if args.child is None:
        return False
    print(json.dumps(run_one(json.loads(args.child), args.max_windows, args.seqlen)))
    return True


def eval_args(args) -> list[str]:
    return ["--max-windows", str(args.max_windows), "--seqlen", str(args.seqlen)]


def perplexities(model, tokenizer, max_windows: int, seqlen: int, sets=("wikitext2", "c4")) -> dict[str, float]:
    """``ppl_<set>`` of the model on each set's test text (the GPTQ protocol of sensiquant.eval)."""
    from sensiquant import evaluate_perplexity

    return {f"ppl_{name}": r.ppl for name, r in evaluate_perplexity(model, tokenizer, sets, seqlen, max_windows,
                                                                    progress=False).items()}
