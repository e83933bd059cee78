"""Command line: ``sensiquant quantize``, ``sensiquant plan`` and ``sensiquant eval``."""

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
    q.add_argument("--bits", type=int, default=None, help="default 4; gwq: 3")
    q.add_argument("--group-size", type=int, default=None, help="columns per group; -1 for per-channel (default 64)")
    q.add_argument("--quant-meta", action=argparse.BooleanOptionalAction, default=None,
                   help="store scales and zeros in 8 bits, groups of 128 (default off; gwq: on)")
    q.add_argument("--skip", default="lm_head,*embed*", help="comma-separated name patterns left in full precision")
    q.add_argument("--out", default=None, help="checkpoint directory to write")
    q.add_argument("--plan", default=None, help="plan JSON from `sensiquant plan` (per-layer configs)")
    q.add_argument("--budget", type=float, default=None,
                   help="bits/param for all quantized linears: plan with the best method, then quantize")
    g = q.add_argument_group("gwq")
    g.add_argument("--backend", choices=["rtn", "hqq", "gptq"], default="gptq", help="quantizer of non-outliers")
    g.add_argument("--outlier-ratio", type=float, default=0.0099,
                   help="share of weights kept in FP16 (default 0.0099: 3.598 bits/param at 3-bit g64 meta8)")
    g.add_argument("--outlier-scope", choices=["matrix", "global"], default="matrix")
    g.add_argument("--saliency", default="grad",
                   help="grad, grad_weight, fisher, hessian, activation, magnitude, random")
    g.add_argument("--calib", default="wikitext2", help="calibration set or text file (validation split)")
    g.add_argument("--calib-samples", type=int, default=16)
    g.add_argument("--calib-seqlen", type=int, default=2048)
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: process columns by descending Hessian diagonal (default on)")
    g.add_argument("--grid", choices=["hqq", "rtn"], default="hqq",
                   help="gwq: grid fit of the non-outlier weights under GPTQ (default hqq)")
    g.add_argument("--seed", type=int, default=0)
    _add_eval_args(q, default_ppl=None)

    p = sub.add_parser("plan", help="choose per-layer bits for a memory budget and write the plan as JSON")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"hub id, local directory, .gguf file, or {DEFAULT_MODEL} (default)")
    p.add_argument("--budget", type=float, required=True, help="bits per parameter, everything counted")
    p.add_argument("--method", choices=["uniform", "mxq", "sensiboost", "kurtboost"], default="sensiboost")
    p.add_argument("--exact", action="store_true",
                   help="keep the boosted plan within the budget (the least important layers pay for it)")
    p.add_argument("--outlier-ratios", default="0",
                   help="comma-separated GWQ outlier shares a matrix may take, e.g. 0,0.005,0.01 (needs --exact)")
    p.add_argument("--error-metric", choices=["frobenius", "fisher"], default="frobenius")
    p.add_argument("--backend", choices=["hqq", "rtn", "gptq"], default="hqq",
                   help="how the plan is applied: HQQ/RTN directly, or GPTQ on the HQQ grid (needs calibration)")
    p.add_argument("--stop", type=int, default=2, help="ladder rungs a flagged layer goes up")
    p.add_argument("--threshold", type=float, default=3.0, help="z-score that flags a layer")
    p.add_argument("--top-m", type=int, default=3, help="flag at most this many layers (-1: all)")
    p.add_argument("--ladder", default=None, help="comma-separated rungs, e.g. b2g64,b3g128,b4g64 (default: all)")
    p.add_argument("--calib", default="wikitext2", help="calibration set or text file (validation split)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--skip", default="lm_head,*embed*", help="comma-separated name patterns left in full precision")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--plots", default=None, help="folder for PNG plots of the scores and the allocation")
    p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (or $SENSIQUANT_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or a checkpoint")
    e.add_argument("model", help="hub id, local directory, .gguf file, checkpoint directory, or smollm2-135m")
    _add_eval_args(e, default_ppl=None)
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks (piqa,arc_easy,arc_challenge,boolq,winogrande,hellaswag,"
                        "lambada_openai,openbookqa,copa) or 'all' for the first eight; default: --ppl wikitext2 only")
    e.add_argument("--limit", type=int, default=None, help="score only the first N examples of each task")
    e.add_argument("--batch-tokens", type=int, default=4096, help="padded tokens per zero-shot forward batch")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (bfloat16 is faster on CPUs with AVX512-BF16 or AMX)")

    for command, helptext in (("generate", "greedy text from a model or a quantized checkpoint"),
                              ("bench-speed", "prefill and decode tokens/s and peak memory at batch 1")):
        r = sub.add_parser(command, help=helptext)
        r.add_argument("model", help="checkpoint directory, hub id, local directory, .gguf file, or smollm2-135m")
        if command == "generate":
            r.add_argument("prompt", help="text to continue")
            r.add_argument("--max-new-tokens", type=int, default=64)
        else:
            r.add_argument("--prompt-tokens", type=int, default=512, help="prompt length (WikiText-2 test text)")
            r.add_argument("--new-tokens", type=int, default=128, help="tokens to decode after the prompt")
            r.add_argument("--data-dir", default=None, help="folder laid out like shared/data")
        r.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                       help="compute dtype (default bfloat16)")
        r.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                       help="quantized layers through the packed CPU kernels (default on)")
        r.add_argument("--widen", action=argparse.BooleanOptionalAction, default=False,
                       help="hold 2/3-bit codes as 4-bit codes for PyTorch's int4 kernel (4 bits in memory; default "
                            "off: they stay at their own width in the C++ kernel)")
        r.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
        r.add_argument("--json", action="store_true", help="print the result as JSON")
        r.add_argument("--quiet", action="store_true", help="no progress bars")
        r.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")
    return parser


def _load_for_inference(args):
    """Model and tokenizer in the compute dtype; quantized layers swapped for the fast kernels unless --no-fast."""
    import torch

    from .models import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise SensiquantError(f"threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise SensiquantError(f"{args.model} has no tokenizer files")
    paths: dict[str, str] = {}
    if args.fast and getattr(model, "sensiquant_report", None) is not None:
        from .nn.kernels import convert_to_fast, quant_weight_bytes

        paths = convert_to_fast(model, dtype=dtype, widen=args.widen)
    else:
        model.to(dtype)
    from .models import use_fp32_attention

    # bf16 attention on the CPU is slow without AMX (see use_fp32_attention): scores in fp32 for every model alike
    attention = "sdpa, scores in fp32" if use_fp32_attention(model) else model.config._attn_implementation
    info = {"model": args.model, "dtype": args.dtype, "fast": bool(paths), "attention": attention,
            "kernels": {k: sum(1 for v in paths.values() if v == k) for k in sorted(set(paths.values()))}}
    if paths:
        from .nn.kernels import build_extension as build_info
        from .nn.kernels import extension_available, extension_error

        info["extension"] = build_info() if extension_available() else {"error": extension_error()}
    report = getattr(model, "sensiquant_report", None)
    if report is not None:
        info["bits_per_param"] = report.bits_per_param
        info["stored_weight_bytes"] = report.quantized_bits // 8
        if paths:
            info["resident_weight_bytes"] = quant_weight_bytes(model)
    return model, tokenizer, info


def _cmd_generate(args) -> dict:
    from .speed import greedy_generate

    if args.max_new_tokens < 2:
        raise SensiquantError(f"--max-new-tokens must be at least 2, got {args.max_new_tokens}")
    model, tokenizer, info = _load_for_inference(args)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    tokens, prefill, decode = greedy_generate(model, ids, args.max_new_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {**info, "prompt": args.prompt, "completion": text, "tokens": tokens,
            "decode_tokens_per_second": (len(tokens) - 1) / decode if decode > 0 else None}


def _cmd_bench_speed(args) -> dict:
    import os

    from .speed import measure_speed

    if args.data_dir:
        os.environ["SENSIQUANT_DATA_DIR"] = args.data_dir
    model, tokenizer, info = _load_for_inference(args)
    result = measure_speed(model, tokenizer, args.prompt_tokens, args.new_tokens)
    return {**info, **result.to_dict()}


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


def _split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _plan_config(args, method: str, exact: bool = False, **overrides):
    """The PlanConfig of a command line; ``overrides`` (e.g. the best method's settings) win over the flags."""
    from .planning import PlanConfig

    try:
        ratios = [float(r) for r in _split(getattr(args, "outlier_ratios", "0"))] or [0.0]
    except ValueError:
        raise SensiquantError(f"bad --outlier-ratios {args.outlier_ratios!r}: expected numbers like 0,0.01") from None
    kwargs = {"method": method, "budget": args.budget, "exact": exact, "outlier_ratios": ratios,
              "skip": _split(args.skip), "data_dir": args.data_dir}
    for name in ("error_metric", "stop", "threshold", "calib", "calib_samples", "calib_seqlen"):
        if hasattr(args, name):
            kwargs[name] = getattr(args, name)
    if args.command == "plan":
        kwargs["backend"] = args.backend
    if getattr(args, "top_m", None) is not None:
        kwargs["top_m"] = None if args.top_m < 0 else args.top_m
    if getattr(args, "ladder", None):
        kwargs["ladder"] = _split(args.ladder)
    return PlanConfig(**{**kwargs, **overrides})


def _cmd_plan(args) -> dict:
    from .api import plan as make_plan

    config = _plan_config(args, args.method, args.exact)
    plan = make_plan(args.model, config, progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    plan.save(args.out)
    result = {"model": args.model, **plan.summary(), "plan": args.out, "seconds": sum(plan.seconds.values())}
    if args.plots:
        from pathlib import Path

        from .plots import plot_allocation, plot_profiles

        folder = Path(args.plots)
        result["plots"] = [str(plot_allocation(plan, folder / "allocation.png"))]
        if plan.profiles:
            result["plots"].append(str(plot_profiles(plan, folder / "scores.png")))
    return result


def _given(value, default):
    """The command-line value, or the method's default when the option was not given."""
    return default if value is None else value


def _cmd_quantize(args) -> dict:
    from .api import model_size_bytes, quantize
    from .config import LayerSpec, QuantConfig
    from .gwq import DEFAULT_SPEC as GWQ_DEFAULT_SPEC
    from .gwq import GWQConfig

    if args.plan or args.budget is not None:
        return _cmd_quantize_planned(args)

    gwq = None
    if args.method == "gwq":
        gwq = GWQConfig(backend=args.backend, saliency=args.saliency, outlier_ratio=args.outlier_ratio,
                        outlier_scope=args.outlier_scope, calib=args.calib, calib_samples=args.calib_samples,
                        calib_seqlen=args.calib_seqlen, act_order=args.act_order, seed=args.seed,
                        data_dir=args.data_dir)
    grid = args.grid if args.method == "gwq" else args.method
    base = GWQ_DEFAULT_SPEC if args.method == "gwq" else LayerSpec()
    spec = LayerSpec(method=grid, bits=_given(args.bits, base.bits),
                     group_size=_given(args.group_size, base.group_size),
                     quant_meta=_given(args.quant_meta, base.quant_meta))
    config = QuantConfig(default=spec, skip=_split(args.skip))
    texts = _eval_texts(args)
    model, tokenizer, report = quantize(args.model, config, args.out, progress=not args.quiet,
                                        trust_remote_code=args.trust_remote_code, gwq=gwq)
    result = {"model": args.model, "spec": spec.to_dict(), **report.summary(),
              "model_bytes": model_size_bytes(model), "out": args.out}
    result["ppl"] = _evaluate(model, tokenizer, texts, args)
    return result


def _cmd_quantize_planned(args) -> dict:
    from .alloc.plan import Plan
    from .api import model_size_bytes, quantize_with_plan
    from .planning import BEST_METHOD

    if args.plan and args.budget is not None:
        raise SensiquantError("give either --plan or --budget, not both")
    plan = Plan.load(args.plan) if args.plan else _plan_config(args, **BEST_METHOD)
    texts = _eval_texts(args)
    model, tokenizer, report, plan = quantize_with_plan(args.model, plan, args.out, progress=not args.quiet,
                                                        trust_remote_code=args.trust_remote_code)
    result = {"model": args.model, **report.summary(), "model_bytes": model_size_bytes(model), "out": args.out}
    result["ppl"] = _evaluate(model, tokenizer, texts, args)
    return result


def _cmd_eval(args) -> dict:
    import torch

    from .api import model_size_bytes
    from .eval.zeroshot import evaluate_zeroshot, load_task, resolve_tasks
    from .models import float32_head, load_model

    if args.ppl is None and args.tasks is None:
        args.ppl = "wikitext2"
    texts = _eval_texts(args)
    tasks = resolve_tasks(args.tasks) if args.tasks else []
    for name in tasks:  # every task file read before the model loads, so a missing one fails fast
        load_task(name, args.data_dir, args.limit)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise SensiquantError(f"{args.model} has no tokenizer files")
    result = {"model": args.model, "model_bytes": model_size_bytes(model), "dtype": args.dtype}
    report = getattr(model, "sensiquant_report", None)
    if report is not None:
        result["bits_per_param"] = report.bits_per_param
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
        float32_head(model)
    result["ppl"] = _evaluate(model, tokenizer, texts, args)
    if tasks:
        scores = evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir,
                                   batch_tokens=args.batch_tokens, progress=not args.quiet)
        result["tasks"] = {name: r.to_dict() for name, r in scores.items()}
    return result


def _print_human(result: dict) -> None:
    if "bits_per_param" in result:
        line = f"bits/param {result['bits_per_param']:.4f}"
        if "quantized_bytes" in result:
            line += f", quantized linears {result['quantized_bytes'] / 2**20:.2f} MiB"
        if "seconds" in result:
            line += f", quantized in {result['seconds']:.1f} s"
        print(line)
    if "configs" in result:
        print(f"plan: {result['method']}{' (exact)' if result['exact'] else ''}, budget "
              f"{result['budget_bits_per_param']:.4f}, configs {result['configs']}, flagged {result['flagged']}")
    if "completion" in result:
        print(result["prompt"] + result["completion"])
    if "decode_tokens_per_second" in result and "prefill_tokens_per_second" in result:
        print(f"prefill {result['prefill_tokens_per_second']:.1f} tok/s ({result['prompt_tokens']} tokens), decode "
              f"{result['decode_tokens_per_second']:.1f} tok/s ({result['new_tokens']} tokens), "
              f"{result['dtype']}, kernels {result['kernels'] or 'none'}, {result['threads']} threads")
    if "model_bytes" in result:
        print(f"model size {result['model_bytes'] / 2**20:.2f} MiB (all stored tensors)")
    for path in [result.get("plan")] if isinstance(result.get("plan"), str) else []:
        print(f"plan written to {path}")
    for path in result.get("plots", []):
        print(f"plot written to {path}")
    for name, r in result.get("ppl", {}).items():
        print(f"{name}: ppl {r['ppl']:.4f} ({r['n_windows']} windows x {r['seqlen']} tokens, {r['seconds']:.1f} s)")
    for name, r in result.get("tasks", {}).items():
        line = f"{name}: acc {r['acc']:.4f} +- {r['acc_stderr']:.4f}"
        if "acc_norm" in r:
            line += f", acc_norm {r['acc_norm']:.4f} +- {r['acc_norm_stderr']:.4f}"
        if "ppl" in r:
            line += f", ppl {r['ppl']:.3f}"
        print(f"{line} (n={r['n']}, {r['seconds']:.1f} s)")
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
        commands = {"quantize": _cmd_quantize, "plan": _cmd_plan, "eval": _cmd_eval, "generate": _cmd_generate,
                    "bench-speed": _cmd_bench_speed}
        result = commands[args.command](args)
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
