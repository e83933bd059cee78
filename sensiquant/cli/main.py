"""Command line: ``sensiquant quantize``, ``plan``, ``eval``, ``generate`` and ``bench-speed``. Defaults come from
the config dataclasses and recipes; handlers live in :mod:`sensiquant.cli.commands`."""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import SensiquantError
from ..runtime.decode import HEAD_BITS
from ..runtime.speed import DECODERS, DEFAULT_DECODER


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error of every other failure (``sensiquant: error: ...``, exit 2)."""

    def error(self, message: str):
        self.exit(2, f"sensiquant: error: {self.prog}: {message}\n")


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


POSITIVE = _at_least(1)


def _add_common(p: argparse.ArgumentParser, data: bool = True) -> None:
    if data:
        p.add_argument("--data-dir", default=None, help="folder laid out like shared/data (or $SENSIQUANT_DATA_DIR)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model's repo")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _add_ppl(p: argparse.ArgumentParser) -> None:
    from ..eval.perplexity import SEQLEN

    p.add_argument("--ppl", default=None, help="comma-separated sets or text files to score (wikitext2, c4, path)")
    p.add_argument("--seqlen", type=_at_least(2), default=SEQLEN, help=f"window length in tokens (default {SEQLEN})")
    p.add_argument("--max-windows", type=POSITIVE, default=None, help="evaluate only the first N windows")


def build_parser() -> argparse.ArgumentParser:
    import sensiquant

    from ..api import DEFAULT_RECIPE
    from ..calib import CalibConfig
    from ..eval.zeroshot import BATCH_TOKENS
    from ..format.ggml import TYPES as GGUF_TYPES
    from ..format.spec import OUTLIER_FORMATS
    from ..io.gguf_export import PLAIN_TYPES
    from ..io.models import DEFAULT_MODEL
    from ..methods import SALIENCIES, OutlierConfig, SignRoundConfig
    from ..methods.outliers import SCOPES
    from ..pipeline import DEFAULT_SKIP, GWQ_SPEC, PRESETS, RECIPES
    from ..planning import BEST_METHOD, ERROR_FITS, ERROR_METRICS, OBJECTIVES, PLAN_METHODS, PlanConfig
    from ..planning.plan import APPLY_METHODS
    from ..runtime.device import DEFAULT_DEVICE

    calib, outliers, plan, tuning = CalibConfig(), OutlierConfig(), PlanConfig(), SignRoundConfig()
    parser = _Parser(prog="sensiquant", description=__doc__.split(".")[0])
    parser.add_argument("--version", action="version", version=f"sensiquant {sensiquant.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = f"hub id, local directory, .gguf file, or {DEFAULT_MODEL} (default)"

    q = sub.add_parser("quantize", help="quantize a model and write a checkpoint")
    q.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    q.add_argument("--method", choices=RECIPES, default=None,
                   help=f"recipe (default {DEFAULT_RECIPE}): rtn/hqq round to nearest on the min-max/HQQ grid; gptq; "
                        "gptaq = gptq matched to the full-precision outputs; gwq = gptq + gradient-ranked outliers")
    q.add_argument("--preset", choices=PRESETS, default=None,
                   help="whole jobs at gwq's size with block outliers: fast (gptq, 2 calibration windows) or best "
                        "(block-tuned HQQ grid, 16 windows); other flags change them. With --budget, best applies "
                        "the plan on the HQQ grid and block-tunes it, 16 windows")
    q.add_argument("--bits", type=int, default=None, help="code width 2, 3, 4 or 8 (default: rtn/hqq 4, else 3)")
    q.add_argument("--group-size", type=int, default=None, help="columns per group; -1 for per-channel (default 64)")
    q.add_argument("--quant-meta", action=argparse.BooleanOptionalAction, default=None,
                   help="store scales and zeros in 8 bits, groups of 128 (default: off for rtn/hqq, on for the others)")
    q.add_argument("--grid", choices=["rtn", "hqq"], default=None,
                   help="grid fit of gptq/gptaq/gwq (default hqq; rtn and hqq name their own)")
    q.add_argument("--gguf", choices=list(GGUF_TYPES), default=None,
                   help="store the codes on a llama.cpp block type, ready for `sensiquant export gguf` (sets bits "
                        "and group size; no outliers: with --method gptq, rtn or hqq; K-types fall back to "
                        "llama.cpp's type on rows that are not multiples of 256)")
    q.add_argument("--skip", default=",".join(DEFAULT_SKIP),
                   help="comma-separated name patterns kept in full precision")
    q.add_argument("--out", default=None, help="checkpoint directory to write (new or empty)")
    q.add_argument("--overwrite", action="store_true", help="replace the sensiquant checkpoint already at --out")
    q.add_argument("--device", default=DEFAULT_DEVICE,
                   help="where the model and its statistics live while quantizing: auto (a GPU where there is one), "
                        f"cpu, cuda, cuda:N (default {DEFAULT_DEVICE})")
    q.add_argument("--stream", action="store_true",
                   help="keep only one decoder block's weights in memory at a time (models larger than memory; a "
                        "local safetensors folder or GGUF file)")
    q.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished work beside --out and go on from what an interrupted run of the same "
                        "command kept (default: on); --no-resume starts afresh")
    q.add_argument("--plan", default=None, help="plan JSON from `sensiquant plan` (per-layer configs)")
    q.add_argument("--budget", type=float, default=None,
                   help="bits/param for all quantized linears: plan with the best method, then quantize")
    q.add_argument("--ladder", default=None,
                   help="with --budget: the rungs the plan may use, as for `sensiquant plan` (gguf: every GGUF type); "
                        "default: the b* rungs, 2-bit ones only when 3-bit ones cannot meet the budget")
    g = q.add_argument_group("outliers and calibration")
    g.add_argument("--outlier-ratio", type=float, default=None,
                   help=f"share of weights kept as outliers (default: gwq {GWQ_SPEC.outlier_ratio}, else 0)")
    g.add_argument("--outlier-format", choices=OUTLIER_FORMATS, default=None,
                   help="csr: FP16 values (about 34 bits per outlier); block: 8-bit residuals in blocks of 255 "
                        "(about 19 bits at 1%%) (default: the recipe's)")
    g.add_argument("--outlier-scope", choices=SCOPES, default=None, help=f"default {outliers.scope}")
    g.add_argument("--saliency", choices=SALIENCIES, default=None, help=f"ranking (default {outliers.saliency})")
    g.add_argument("--calib", default=None, help=f"calibration set or text file (default {calib.source})")
    g.add_argument("--calib-samples", type=POSITIVE, default=None, help=f"windows (default {calib.samples})")
    g.add_argument("--calib-seqlen", type=_at_least(2), default=None,
                   help=f"tokens per window (default {calib.seqlen})")
    g.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="GPTQ: process columns by descending Hessian diagonal (default on)")
    g.add_argument("--seed", type=int, default=None, help=f"calibration seed (default {calib.seed})")
    t = q.add_argument_group("block tuning (SignRound)")
    t.add_argument("--tune", action=argparse.BooleanOptionalAction, default=None,
                   help="tune the rounding block by block to match the full-precision block outputs (default: on "
                        "for --preset best; also applies with --plan and --budget)")
    t.add_argument("--tune-iters", type=_at_least(0), default=None, help=f"steps per block (default {tuning.iters})")
    t.add_argument("--tune-lr", type=float, default=None,
                   help=f"first step, decayed linearly to 0 (default {tuning.lr}; 0.02 = 1/iters won with 16 windows, "
                        "BENCHMARKS.md)")
    t.add_argument("--tune-dtype", choices=["float32", "bfloat16"], default=None,
                   help=f"dtype of the tuning forward/backward (default {tuning.compute_dtype})")
    _add_ppl(q)
    _add_common(q)

    p = sub.add_parser("plan", help="choose per-layer bits for a memory budget and write the plan as JSON")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--budget", type=float, required=True, help="bits per parameter, everything counted")
    p.add_argument("--method", choices=PLAN_METHODS, default=None, help=f"default {plan.method}")
    p.add_argument("--exact", action="store_true", default=None,
                   help="keep the boosted plan within the budget (the least important layers pay for it)")
    p.add_argument("--outlier-ratios", default=None,
                   help="comma-separated GWQ outlier shares a matrix may take, e.g. 0,0.005,0.01 (needs --exact)")
    p.add_argument("--outlier-format", choices=OUTLIER_FORMATS, default=None,
                   help=f"how the plan's outliers are stored: csr (FP16) or block (int8 residuals) "
                        f"(default {plan.outlier_format})")
    p.add_argument("--error-metric", choices=ERROR_METRICS, default=None,
                   help=f"default {plan.error_metric}")
    p.add_argument("--objective", choices=OBJECTIVES, default=None,
                   help="what the allocation sums over matrices: their errors (root) or their squares, the "
                        f"second-order loss estimate (loss) (default {plan.objective})")
    p.add_argument("--apply-method", choices=APPLY_METHODS, default=None,
                   help=f"how the plan is applied: round on the grid, or GPTQ on it (default {plan.apply_method})")
    p.add_argument("--error-rows", type=int, default=None,
                   help="output rows per matrix the error table measures, a seeded sample; 0: all rows (default "
                        f"{plan.error_rows or 0})")
    p.add_argument("--error-fit", choices=ERROR_FITS, default=None,
                   help="grid fit of the error table: light (HQQ, one candidate, 10 iterations) or full (the rung's "
                        f"own fit) (default {plan.error_fit})")
    p.add_argument("--stop", type=int, default=None, help=f"ladder rungs a flagged layer goes up (default {plan.stop})")
    p.add_argument("--threshold", type=float, default=None, help=f"z-score flagging a layer (default {plan.threshold})")
    p.add_argument("--top-m", type=int, default=None, help=f"flag at most N layers, -1: all (default {plan.top_m})")
    p.add_argument("--ladder", default=None,
                   help="comma-separated rungs, e.g. b2g64,b3g128,b4g64, GGUF types (Q4_K, ...) or gguf for all of "
                        "them, so that the plan exports to llama.cpp as it is (default: the b* rungs)")
    p.add_argument("--min-rung-bits", type=_at_least(0), default=None,
                   help="rungs of fewer bits only when the others cannot meet the budget; 0: every rung "
                        f"(default {plan.min_rung_bits}; `quantize --budget` uses {BEST_METHOD['min_rung_bits']})")
    p.add_argument("--calib", default=None, help=f"calibration set or text file (default {calib.source})")
    p.add_argument("--calib-samples", type=POSITIVE, default=None,
                   help=f"sensitivity windows (default {plan.sensitivity_calib.samples})")
    p.add_argument("--calib-seqlen", type=_at_least(2), default=None,
                   help=f"tokens per sensitivity window (default {plan.sensitivity_calib.seqlen})")
    p.add_argument("--seed", type=int, default=None, help=f"calibration seed (default {calib.seed})")
    p.add_argument("--skip", default=",".join(DEFAULT_SKIP),
                   help="comma-separated name patterns kept in full precision")
    p.add_argument("--out", required=True, help="plan JSON to write")
    p.add_argument("--plots", default=None, help="folder for PNG plots of the scores and the allocation")
    _add_common(p)

    e = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or a checkpoint")
    e.add_argument("model", help="hub id, local directory, .gguf file, checkpoint directory, or smollm2-135m")
    _add_ppl(e)
    e.add_argument("--tasks", default=None,
                   help="comma-separated zero-shot tasks (piqa,arc_easy,arc_challenge,boolq,winogrande,hellaswag,"
                        "lambada_openai,openbookqa,copa) or 'all' for the first eight; default: --ppl wikitext2 only")
    e.add_argument("--limit", type=POSITIVE, default=None, help="score only the first N examples of each task")
    e.add_argument("--batch-tokens", type=POSITIVE, default=None,
                   help=f"padded tokens per zero-shot forward batch (default {BATCH_TOKENS})")
    e.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype (bfloat16 is faster on CPUs with AVX512-BF16 or AMX)")
    e.add_argument("--stream", action="store_true",
                   help="perplexity with one decoder block's weights in memory at a time (an unquantized local "
                        "model larger than memory)")
    _add_common(e)

    x = sub.add_parser("export", help="write a checkpoint in another runtime's format")
    xs = x.add_subparsers(dest="format", required=True)
    xg = xs.add_parser("gguf", help="a GGUF file for llama.cpp (tokenizer and metadata from the model's GGUF)")
    xg.add_argument("model", help="checkpoint directory")
    xg.add_argument("out", help="the .gguf file to write")
    xg.add_argument("--base", default=None,
                    help="the GGUF the model was converted from (default: the checkpoint's base model)")
    xg.add_argument("--fallback", choices=list(GGUF_TYPES), default=None,
                    help="round layers not quantized on a GGUF grid onto this type (default: refuse them)")
    xg.add_argument("--embed-type", choices=[*PLAIN_TYPES, *GGUF_TYPES], default="F16",
                    help="type of the embeddings and the output head (default F16)")
    _add_common(xg, data=False)
    xc = xs.add_parser("compressed-tensors", help="a compressed-tensors (pack-quantized) checkpoint for vLLM and "
                                                  "transformers")
    xc.add_argument("model", help="checkpoint directory")
    xc.add_argument("out", help="the directory to write (new, empty, or a previous export)")
    _add_common(xc, data=False)

    v = sub.add_parser("verify", help="check a checkpoint whole: structure against the accounting, and the checksum")
    v.add_argument("model", help="checkpoint directory")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.add_argument("--debug", action="store_true", help="show the traceback of an error")

    for command, helptext in (("generate", "greedy text from a model or a quantized checkpoint"),
                              ("bench-speed", "prefill and decode tokens/s and peak memory at batch 1")):
        r = sub.add_parser(command, help=helptext)
        r.add_argument("model", help="checkpoint directory, hub id, local directory, .gguf file, or smollm2-135m")
        if command == "generate":
            r.add_argument("prompt", help="text to continue")
            r.add_argument("--max-new-tokens", type=_at_least(2), default=64, help="tokens to generate (default 64)")
        else:
            r.add_argument("--prompt-tokens", type=POSITIVE, default=512, help="prompt length (WikiText-2 test text)")
            r.add_argument("--new-tokens", type=_at_least(2), default=128, help="tokens to decode after the prompt")
        r.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                       help="compute dtype (default bfloat16)")
        r.add_argument("--fast", action=argparse.BooleanOptionalAction, default=True,
                       help="quantized layers through the packed CPU kernels (default on)")
        r.add_argument("--widen", action=argparse.BooleanOptionalAction, default=False,
                       help="hold 2/3-bit codes as 4-bit codes for PyTorch's int4 kernel (4 bits in memory; default "
                            "off: they stay at their own width in the C++ kernel)")
        r.add_argument("--decoder", choices=DECODERS, default=DEFAULT_DECODER,
                       help="lean: our static-cache decode loop (LLaMA, Qwen2, Mistral); transformers: the model's "
                            f"own forward; auto: lean where it runs the model (default {DEFAULT_DECODER})")
        r.add_argument("--head-bits", type=int, choices=HEAD_BITS, default=None,
                       help="lean decoder: run the output head as an RTN-quantized copy at these bits (default: the "
                            "head as loaded)")
        r.add_argument("--act8", action="store_true",
                       help="lean decoder: round the inputs of packed 2-4-bit layers to int8 per block of 32 and sum "
                            "their products in integers, as llama.cpp's K-quants do (x86 AVX2/AVX-512; default off: "
                            "exact inputs)")
        r.add_argument("--threads", type=POSITIVE, default=None, help="torch threads (default: all cores)")
        _add_common(r, data=command == "bench-speed")
    return parser


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
    if result.get("gguf"):
        bits = result["linear_bits_per_param"]
        print(f"GGUF written to {result['gguf']}: {result['bytes'] / 2**20:.2f} MiB, linears "
              f"{'-' if bits is None else f'{bits:.4f}'} bits/param, types {result['tensor_types']}"
              + (f", {result['requantized_layers']} layers rounded onto --fallback" if result["requantized_layers"]
                 else ""))
    if result.get("compressed_tensors"):
        print(f"compressed-tensors checkpoint written to {result['compressed_tensors']}: {result['bytes'] / 2**20:.2f} "
              f"MiB, {result['layers']} layers in {len(result['config_groups'])} config groups, linears "
              f"{result['linear_bits_per_param']:.4f} bits/param")
    if "verified" in result:
        v = result["verified"]
        checksum = "sha256 ok" if v.get("sha256_ok") else v.get("checksum", "no checksum")
        print(f"{result['model']}: verified (format {v['format_version']}): {v['layers']} quantized layers, "
              f"{v['tensors']} tensors, {v['bytes']} bytes, {checksum}")
    print(f"peak RSS {result['peak_rss_mb']:.0f} MiB, wall {result['wall_seconds']:.1f} s")


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SensiquantError):
        return str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{':' if where else ''}{where}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:500]} (run with --debug for the traceback)"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that scratch folders and half-written files are removed on the way out."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    from .commands import COMMANDS

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, see _Parser.error), --help or --version
        return exc.code if isinstance(exc.code, int) else 2
    start = time.perf_counter()
    if args.quiet:
        import os

        from transformers.utils import logging as hf_logging

        os.environ["TQDM_DISABLE"] = "1"  # also the bars of libraries that use tqdm directly (GGUF conversion)

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result = COMMANDS[args.command](args)
    except KeyboardInterrupt as exc:
        terminated = isinstance(exc, Terminated)
        print(f"sensiquant: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    except Exception as exc:  # the outermost boundary: every failure becomes one line (--debug: the traceback)
        if args.debug:
            raise
        print(f"sensiquant: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    from ..calib.distributed import is_main
    from ..runtime.speed import peak_rss_mb

    if not is_main():  # under torchrun, rank 0 reports
        return 0
    result["peak_rss_mb"] = peak_rss_mb()
    result["wall_seconds"] = time.perf_counter() - start
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_human(result)
    return 0
