"""Shared benchmark plumbing: every configuration runs in a fresh process (so peak RSS is its own) and results
are appended to a JSON file as they come, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, spec: dict | None, extra_args: list[str]) -> dict:
    """Run ``script --child SPEC`` and return the JSON object it prints last (or the error it died with)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", json.dumps(spec), *extra_args],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        return {"error": lines[-1]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "wall_seconds": time.perf_counter() - start}


def run_all(script: str, configs: list[tuple[str, dict | None]], out: str, header: dict, extra_args: list[str],
            resume: bool = True) -> list[dict]:
    """Run every (name, spec) not already in ``out`` (when resuming), writing the file after each one."""
    path = Path(out)
    rows = json.loads(path.read_text())["rows"] if resume and path.is_file() else []
    done = {r["name"] for r in rows if "error" not in r}
    rows = [r for r in rows if r["name"] in done]
    for name, spec in configs:
        if name in done:
            continue
        rows.append({"name": name, "spec": spec, **run_child(script, spec, extra_args)})
        print(json.dumps(rows[-1]), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**header, "rows": rows}, indent=2))
    return rows


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
