"""Batch-1 inference speed on CPU: the originals, sensiquant checkpoints through the fast kernels, and llama.cpp.

SmolLM2-135M, a 512-token WikiText-2 prompt then 128 greedy tokens; prefill tok/s, decode tok/s, peak RSS, and
for sensiquant the bytes the quantized weights occupy in memory against what bits/param predicts. Every row runs in
a fresh process; checkpoints are made once (``--work-dir``) and reused. Run alone on the machine.

    python -m bench.speed [--threads 2] [--out bench/results/speed.json]
    python -m bench.speed --out bench/results/speed_avx2.json      # on an AVX2 machine without AVX-512
    python -m bench.speed --isa avx2 --out bench/results/speed_avx2.json   # AVX2 paths on an AVX-512 machine

Each sensiquant row runs with each decoder of ``--decoders`` (default: the lean static-cache loop, then
transformers' own forward), so the table shows what the decode loop itself is worth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from bench.common import RESULTS, peak_rss_mb, run_json, write_json

# name -> (quantize arguments, or None for the original; dtype); rows named "CHECKPOINT, VARIANT" reuse the
# checkpoint of the row named CHECKPOINT and run bench-speed with the extra arguments of SPEED_ARGS
ROWS: dict[str, tuple[list[str] | None, str]] = {
    "original fp32": (None, "float32"),
    "original bf16": (None, "bfloat16"),
    "4-bit g64 (hqq)": (["--method", "hqq", "--bits", "4", "--group-size", "64"], "bfloat16"),
    "4-bit g128 (hqq)": (["--method", "hqq", "--bits", "4", "--group-size", "128"], "bfloat16"),
    "3-bit g64 (hqq)": (["--method", "hqq", "--bits", "3", "--group-size", "64"], "bfloat16"),
    # the same checkpoint with its 3-bit codes held as 4-bit codes for PyTorch's int4 kernel (bench-speed --widen)
    "3-bit g64 (hqq), widened to 4 bits": (["--method", "hqq", "--bits", "3", "--group-size", "64"], "bfloat16"),
    # the head (49,152 x 576, tied to the embedding) as an RTN copy at run time: the largest matmul of a decode step
    "4-bit g64 (hqq), 8-bit head": (["--method", "hqq", "--bits", "4", "--group-size", "64"], "bfloat16"),
    "4-bit g64 (hqq), 4-bit head": (["--method", "hqq", "--bits", "4", "--group-size", "64"], "bfloat16"),
    # speed does not depend on calibration size: 4 windows instead of the default 16 to save time
    "gwq 3-bit g64 meta8 + 0.99% outliers": (["--method", "gwq", "--outlier-format", "csr", "--outlier-ratio", "0.0099",
                                              "--calib-samples", "4"], "bfloat16"),
    "gwq 3-bit g64 meta8 + 0.99% outliers, 8-bit head": (["--method", "gwq", "--outlier-format", "csr",
                                                           "--outlier-ratio", "0.0099", "--calib-samples", "4"],
                                                          "bfloat16"),
    # the same with the packed layers' inputs rounded to int8 per block of 32 (bench-speed --act8), as llama.cpp does
    "gwq 3-bit g64 meta8 + 0.99% outliers, 8-bit head, int8 x": (["--method", "gwq", "--outlier-format", "csr",
                                                                  "--outlier-ratio", "0.0099", "--calib-samples", "4"],
                                                                 "bfloat16"),
    # GWQ's default since session 7: 1.9% |g| outliers as block residuals (held as fp32 corrections at run time)
    "gwq 3-bit g64 meta8 + 1.9% block outliers": (["--method", "gwq", "--calib-samples", "4"], "bfloat16"),
    # the budget-exact SensiBoost + Fisher + GWQ plan that bench/alloc.py made for 3.60 bits/param (mixed 2-8 bits)
    "plan at 3.60 bits/param": (["--plan", str(RESULTS / "alloc_plans" /
                                              "bpp3.60-sensiboost_exact_fisher_plusgwq.json")], "bfloat16"),
}
SPEED_ARGS = {"widened to 4 bits": ["--widen"], "8-bit head": ["--head-bits", "8"], "4-bit head": ["--head-bits", "4"],
              "8-bit head, int8 x": ["--head-bits", "8", "--act8"]}
LLAMA_CPP = ("Q4_K_M", "Q3_K_M")
# --isa avx2 on an AVX-512 CPU: our extension, PyTorch's kernels (int4pack, attention) and oneDNN's matmuls all
# limited to AVX2, to measure what an AVX2-only CPU gets (llama.cpp keeps its own build)
ISA_LIMITS = {"avx2": {"SENSIQUANT_EXT_CFLAGS": "-mno-avx512f", "ATEN_CPU_CAPABILITY": "avx2",
                       "ONEDNN_MAX_CPU_ISA": "AVX2"}}
DECODERS = ("lean", "transformers")


def llama_cpp_library(isa: str | None) -> Path | None:
    """The llama.cpp library built for ``isa`` (None: the native build), or None when it is not built."""
    from bench.peers_llamacpp import BIN

    path = BIN if isa is None else BIN.parent.with_name(f"{BIN.parent.name}-{isa}") / "bin"
    return path if (path / "libllama.so").is_file() else None


def cpu_description() -> str:
    """The CPU's model name and its widest vector ISA, for the table's heading."""
    flags, model = set(), "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    isa = ("AVX512-BF16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else
           "AVX2 (no AVX-512)" if "avx2" in flags else "no AVX2")
    return f"{model}, {isa}"


def checkpoint(name: str, quantize_args: list[str], work_dir: Path) -> tuple[Path, dict]:
    """The checkpoint of a row, made once."""
    slug = "".join(c if c.isalnum() else "-" for c in name.split(", ")[0]).strip("-")
    path = work_dir / slug
    if not (path / "sensiquant.json").is_file():
        made = run_json([sys.executable, "-m", "sensiquant", "quantize", "smollm2-135m", *quantize_args, "--out",
                     str(path), "--json", "--quiet"])
        if "error" in made:
            return path, made
    return path, {}


def llama_cpp_row(setting: str, args) -> dict:
    """llama.cpp on the same prompt (llama-cpp-python), from the peer harness's cached quantized GGUF; a child."""
    return run_json([sys.executable, "-m", "bench.speed", "--llama-child", setting, "--threads", str(args.threads),
                 "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                 "--peers-work-dir", args.peers_work_dir])


def _llama_child(args) -> dict:
    from bench.peers import build_context
    from bench.peers_llamacpp import llama_cpp_speed, quantized_gguf
    from sensiquant.io import load_tokenizer
    from sensiquant.runtime.speed import prompt_ids

    ctx = build_context("smollm2-135m", 8, 2048, 16, Path(args.peers_work_dir), None)
    path = quantized_gguf(args.llama_child, ctx)
    ids = prompt_ids(load_tokenizer("smollm2-135m"), args.prompt_tokens)[0].tolist()
    del ctx
    result = llama_cpp_speed(path, ids, args.new_tokens, args.threads)
    return {**result, "file_bytes": Path(path).stat().st_size, "peak_rss_mb": peak_rss_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="runs per row; the faster decode is kept")
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "sensiquant-speed"))
    ap.add_argument("--peers-work-dir", default=str(Path.home() / ".cache" / "sensiquant-peers"))
    ap.add_argument("--rows", default=None, help="row names separated by commas without a space (default: all)")
    ap.add_argument("--isa", choices=sorted(ISA_LIMITS), default=None,
                    help="limit the kernels to this ISA (llama.cpp rows need its build for that ISA: "
                         "LLAMA_ISA=avx2 bash bench/peers_llamacpp_setup.sh)")
    ap.add_argument("--decoders", default=",".join(DECODERS),
                    help="decode loops to run each sensiquant row with (lean, transformers)")
    ap.add_argument("--out", default=str(RESULTS / "speed.json"))
    ap.add_argument("--llama-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llama_child:
        print(json.dumps(_llama_child(args)))
        return
    work = Path(args.work_dir)
    wanted = set(re.split(r",(?! )", args.rows)) if args.rows else None  # names hold ", " themselves
    if args.isa:
        os.environ.update(ISA_LIMITS[args.isa])  # the children inherit it
    library = llama_cpp_library(args.isa)
    if library is not None:
        os.environ["LLAMA_CPP_LIB_PATH"] = str(library)
    decoders = args.decoders.split(",")
    rows = []
    for name, (quantize_args, dtype) in ROWS.items():
        if wanted and name not in wanted:
            continue
        model, made = "smollm2-135m", {}
        if quantize_args is not None:
            path, made = checkpoint(name, quantize_args, work)
            model = str(path)
        for decoder in decoders:
            if "head" in name and decoder != "lean":
                continue  # a quantized head needs the lean decoder
            row = {"name": name, "dtype": dtype, "decoder": decoder, **made}
            if "error" not in row:
                extra = SPEED_ARGS.get(name.partition(", ")[2], [])
                runs = [run_json([sys.executable, "-m", "sensiquant", "bench-speed", model, "--dtype", dtype,
                                  "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
                                  "--new-tokens", str(args.new_tokens), "--decoder", decoder, "--json", "--quiet",
                                  *extra]) for _ in range(args.repeats)]
                ok = [r for r in runs if "error" not in r]
                row.update(max(ok, key=lambda r: r["decode_tokens_per_second"]) if ok else runs[-1])
                row["decode_runs"] = [r.get("decode_tokens_per_second") for r in runs]
            rows.append(row)
            print(json.dumps(row), flush=True)
    for setting in LLAMA_CPP:
        if wanted and f"llama.cpp {setting}" not in wanted:
            continue
        if library is None:
            rows.append({"name": f"llama.cpp {setting}", "error": f"no llama.cpp library built for "
                         f"{args.isa or 'this CPU'}: run {'LLAMA_ISA=' + args.isa + ' ' if args.isa else ''}"
                         "bash bench/peers_llamacpp_setup.sh"})
            continue
        runs = [llama_cpp_row(setting, args) for _ in range(args.repeats)]
        ok = [r for r in runs if "error" not in r]
        best = max(ok, key=lambda r: r["decode_tokens_per_second"]) if ok else runs[-1]
        row = {"name": f"llama.cpp {setting}", **{k: v for k, v in best.items() if k != "generated"}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cpu = cpu_description() + (f", limited to {args.isa.upper()}" if args.isa else "")
    write_json(out, {"cpu": cpu, "isa_limit": ISA_LIMITS.get(args.isa), "threads": args.threads,
                     "llama_cpp_library": None if library is None else str(library),
                     "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                     "time": time.strftime("%Y-%m-%d %H:%M"), "rows": rows})


if __name__ == "__main__":
    main()
