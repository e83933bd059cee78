"""Command line: ``sensiquant quantize`` and ``sensiquant eval``."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

from .errors import SensiquantError
from .models import DEFAULT_MODEL


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _add_eval_args(p: argparse.ArgumentParser, default_ppl: str | None) -> None:
    p.add_argument("--ppl", default=default_ppl,
                   help="comma-separated sets or text files for perplexity (wikitext2, c4, path)")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (or $SENSIQUANT_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sensiquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"hub id, local directory, .gguf file, or {DEFAULT_MODEL} (default)")
    q.add_argument("--method", choices=["rtn", "hqq", "gwq"], default="hqq",
                   help="rtn, hqq, or gwq (gradient-aware FP16 outliers + a --backend for the rest)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=64, help="columns per group; -1 for per-channel")
    q.add_argument("--quant-meta", action="store_true", help="store scales and zeros in 8 bits (groups of 128)")
    q.add_argument("--skip", default="lm_head,*embed*", help="comma-separated name patterns left in full precision")
    q.add_argument("--out", default=None, help="checkpoint directory to write")
    g = q.add_argument_group("gwq")
    g.add_argument("--backend", choices=["rtn", "hqq", "gptq"], default="gptq", help="quantizer of non-outliers")
    g.add_argument("--outlier-ratio", type=float, default=0.01, help="share of weights kept in FP16")
    g.add_argument("--outlier-scope", choices=["matrix", "global"], default="matrix")
    g.add_argument("--saliency", default="grad",
                   help="grad, grad_weight, fisher, hessian, activation, magnitude, random")
    g.add_argument("--calib", default="wikitext2", help="calibration set or text file (validation split)")
    g.add_argument("--calib-samples", type=int, default=4)
    g.add_argument("--calib-seqlen", type=int, default=2048)
    g.add_argument("--act-order", action="store_true", help="GPTQ: process columns by descending Hessian diagonal")
    g.add_argument("--seed", type=int, default=0)
    _add_eval_args(q, default_ppl=None)

    e = sub.add_parser("eval", help="perplexity of a model or a checkpoint")
    e.add_argument("model", help="hub id, local directory, .gguf file, checkpoint directory, or smollm2-135m")
    _add_eval_args(e, default_ppl="wikitext2")
    return parser


def _eval_texts(args) -> dict[str, str]:
    """Read the evaluation texts before any model work, so a missing file fails fast."""
    from .data import load_text

    names = [n.strip() for n in (args.ppl or "").split(",") if n.strip()]
    return {name: load_text(name, "test", args.data_dir) for name in names}


def _evaluate(model, tokenizer, texts: dict[str, str], args) -> dict:
    from .eval import perplexity

    return {name: perplexity(model, tokenizer, text, args.seqlen, args.max_windows, progress=not args.quiet,
                             desc=f"ppl {name}").to_dict()
            for name, text in texts.items()}


def _cmd_quantize(args) -> dict:
    from .api import model_size_bytes, quantize
    from .config import LayerSpec, QuantConfig
    from .gwq import GWQConfig

    gwq = None
    if args.method == "gwq":
        gwq = GWQConfig(backend=args.backend, saliency=args.saliency, outlier_ratio=args.outlier_ratio,
                        outlier_scope=args.outlier_scope, calib=args.calib, calib_samples=args.calib_samples,
                        calib_seqlen=args.calib_seqlen, act_order=args.act_order, seed=args.seed,
                        data_dir=args.data_dir)
    grid = "rtn" if args.method == "gwq" else args.method
    spec = LayerSpec(method=grid, bits=args.bits, group_size=args.group_size, quant_meta=args.quant_meta)
    config = QuantConfig(default=spec, skip=[s.strip() for s in args.skip.split(",") if s.strip()])
    texts = _eval_texts(args)
    model, tokenizer, report = quantize(args.model, config, args.out, progress=not args.quiet,
                                        trust_remote_code=args.trust_remote_code, gwq=gwq)
    result = {"model": args.model, "spec": spec.to_dict(), **report.summary(),
              "model_bytes": model_size_bytes(model), "out": args.out}
    result["ppl"] = _evaluate(model, tokenizer, texts, args)
    return result


def _cmd_eval(args) -> dict:
    from .api import model_size_bytes
    from .models import load_model

    texts = _eval_texts(args)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise SensiquantError(f"{args.model} has no tokenizer files")
    result = {"model": args.model, "model_bytes": model_size_bytes(model)}
    report = getattr(model, "sensiquant_report", None)
    if report is not None:
        result["bits_per_param"] = report.bits_per_param
    result["ppl"] = _evaluate(model, tokenizer, texts, args)
    return result


def _print_human(result: dict) -> None:
    if "bits_per_param" in result:
        line = f"bits/param {result['bits_per_param']:.4f}"
        if "quantized_bytes" in result:
            line += f", quantized linears {result['quantized_bytes'] / 2**20:.2f} MiB"
        if "seconds" in result:
            line += f", quantized in {result['seconds']:.1f} s"
        print(line)
    print(f"model size {result['model_bytes'] / 2**20:.2f} MiB (all stored tensors)")
    for name, r in result.get("ppl", {}).items():
        print(f"{name}: ppl {r['ppl']:.4f} ({r['n_windows']} windows x {r['seqlen']} tokens, {r['seconds']:.1f} s)")
    if result.get("out"):
        print(f"checkpoint written to {result['out']}")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MiB, wall {result['wall_seconds']:.1f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    try:
        result = _cmd_quantize(args) if args.command == "quantize" else _cmd_eval(args)
    except SensiquantError as exc:
        print(f"sensiquant: error: {exc}", file=sys.stderr)
        return 2
    result["peak_rss_mb"] = _peak_rss_mb()
    result["wall_seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
