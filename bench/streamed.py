"""Streaming against the in-memory run (issue 15): the same command with and without ``--stream``, each in a fresh
process, side by side: peak RSS, wall time, perplexity and the sha256 of the checkpoint's weights.

    python -m bench.streamed [--model smollm2-135m] [--modes memory,stream] [--method gwq] [--calib-samples 16]
    (modes: memory = in memory, stream = --stream, original = the unquantized model's perplexity, streamed)
    python -m bench.streamed --model qwen2.5-coder-1.5b --modes stream --calib-samples 4 --ppl wikitext2 \\
        --memory-limit-gib 4                      # an OS-enforced limit: the child runs in a cgroup (v1 or v2)

``--memory-limit-gib`` puts the child process into a new memory cgroup with that hard limit (page cache counts
and is reclaimed; there is no swap here), so a run that needed more would be killed, not slowed. Rows go to
``bench/results/streamed.json`` as they finish; each keeps its command.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import RESULTS, peak_rss_mb, run_json, write_json

_CGROUP_V1 = Path("/sys/fs/cgroup/memory")
_CGROUP_V2 = Path("/sys/fs/cgroup")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def limit_memory(gib: float, name: str) -> str:
    """Move this process into a new memory cgroup limited to ``gib`` GiB; returns the cgroup's path."""
    limit = int(gib * (1 << 30))
    if (_CGROUP_V1 / "memory.limit_in_bytes").exists():
        group = _CGROUP_V1 / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
    else:
        group = _CGROUP_V2 / name
        group.mkdir(exist_ok=True)
        (group / "memory.max").write_text(str(limit))
    (group / "cgroup.procs").write_text(str(os.getpid()))
    return str(group)


def run_one(argv: list[str], out: Path, limit_gib: float | None) -> dict:
    """In the child: optionally limit memory, run the CLI command, add peak RSS, wall time and the weights' hash."""
    from sensiquant.cli.main import main

    row: dict = {}
    if limit_gib is not None:
        row["cgroup"] = limit_memory(limit_gib, f"sensiquant-bench-{os.getpid()}")
        row["memory_limit_gib"] = limit_gib
    buffer = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    if code != 0:
        raise SystemExit(code)
    text = buffer.getvalue()
    result = json.loads(text[text.index("{"):])
    row.update(result=result, wall_seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
    if (out / "model.safetensors").is_file():
        row["weights_sha256"] = _sha256(out / "model.safetensors")
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="memory,stream")
    ap.add_argument("--method", default="gwq")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: the method's")
    ap.add_argument("--ppl", default="wikitext2,c4")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--memory-limit-gib", type=float, default=None)
    ap.add_argument("--work-dir", default="/tmp/sensiquant-bench-streamed")
    ap.add_argument("--out", default=str(RESULTS / "streamed.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        spec = json.loads(args.child)
        print(json.dumps(run_one(spec["argv"], Path(spec["out"]), spec["limit"])))
        return
    path = Path(args.out)
    rows = json.loads(path.read_text())["rows"] if path.is_file() else []
    for mode in args.modes.split(","):
        out = Path(args.work_dir) / f"{Path(args.model).name}-{args.method}-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        if mode == "original":  # the unquantized model's perplexity, streamed block by block
            argv = ["eval", args.model, "--stream", "--quiet", "--json", "--ppl", args.ppl, "--max-windows",
                    str(args.max_windows)]
        else:
            argv = ["quantize", args.model, "--method", args.method, "--out", str(out), "--no-resume", "--quiet",
                    "--json", "--ppl", args.ppl, "--max-windows", str(args.max_windows)]
            if args.calib_samples is not None:
                argv += ["--calib-samples", str(args.calib_samples)]
            if mode == "stream":
                argv.append("--stream")
        spec = {"argv": argv, "out": str(out), "limit": args.memory_limit_gib}
        row = {"model": args.model, "mode": mode, "command": "sensiquant " + " ".join(argv),
               **run_json([sys.executable, "-m", "bench.streamed", "--child", json.dumps(spec)])}
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(path, {"rows": rows})


if __name__ == "__main__":
    main()
