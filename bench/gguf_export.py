"""sensiquant on llama.cpp's own block types, exported to GGUF, against llama.cpp's quantizer (issue 16).

Each sensiquant row quantizes SmolLM2-135M with GPTQ straight onto a GGUF type (``--gguf``; K-types fall back to
llama.cpp's type on rows that are not multiples of 256, as llama.cpp does), calibrated on the harness's WikiText-2
validation windows; scores it on the shared windows in sensiquant; exports it (``sensiquant export gguf``) and
scores the file in llama.cpp on the same windows. Each llama.cpp row is ``llama-quantize --pure`` of the same type
with an importance matrix over the same calibration windows. Bits/param: stored bytes of the block linears.

    python -m bench.gguf_export [--rows gptq-Q4_0,llama-Q4_0,gptq-Q4_0@Q4_0,...] [--max-windows 8] [--calib-windows 4]
    python -m bench.gguf_export --model qwen2.5-coder-1.5b --rows gptq-Q3_K,llama-Q3_K --max-windows 4
        (rows that are multiples of 256 take K-types everywhere; results in gguf_export_MODEL.json)

``ROW@TYPE`` exports the checkpoint of an earlier sensiquant row again with embeddings and head in TYPE.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch

from bench import peers_llamacpp as llama
from bench.common import RESULTS
from bench.peers import build_context

# sensiquant GPTQ on a GGUF grid, and llama.cpp's --pure quantization of the same type (the ftype whose base type
# it is) with an importance matrix
SENSIQUANT_ROWS = {"gptq-Q4_0": "Q4_0", "gptq-Q3_K": "Q3_K", "gptq-Q2_K": "Q2_K", "gptq-Q4_K": "Q4_K",
                   "hqq-Q4_0": "Q4_0"}
LLAMA_ROWS = {"llama-Q4_0": "Q4_0+imatrix+pure", "llama-Q3_K": "Q3_K_S+imatrix+pure",
              "llama-Q2_K": "Q2_K+imatrix+pure", "llama-Q4_K": "Q4_K_S+imatrix+pure"}
DEFAULT_ROWS = ["gptq-Q4_0", "llama-Q4_0", "gptq-Q3_K", "llama-Q3_K", "gptq-Q2_K", "llama-Q2_K"]


def _ppl(nll: dict[str, tuple[float, int]]) -> dict[str, float]:
    return {name: math.exp(total / count) for name, (total, count) in nll.items()}


def sensiquant_row(name: str, ctx, out_dir: Path) -> dict:
    from sensiquant import GPTQConfig, LayerSpec, QuantConfig, RoundConfig, quantize_model
    from sensiquant.eval import nll_of_windows
    from sensiquant.io import save_quantized
    from sensiquant.io.gguf_export import export_gguf

    method, kind = name.split("-")[0], SENSIQUANT_ROWS[name]
    model, tokenizer = ctx.load_base()
    config = QuantConfig(method=GPTQConfig() if method == "gptq" else RoundConfig(),
                         default=LayerSpec(grid="hqq", gguf=kind))
    start = time.perf_counter()
    report = quantize_model(model, config, tokenizer, progress=False, calib_batches=ctx.calib_windows)
    seconds = time.perf_counter() - start
    ckpt = out_dir / f"sq-{name}"
    if ckpt.is_dir():
        shutil.rmtree(ckpt)
    save_quantized(model, tokenizer, ckpt, config, report, card={"base_model": ctx.model_name})
    ours = _ppl({n: nll_of_windows(model, w) for n, w in ctx.windows.items()})
    gguf_file = out_dir / f"sq-{name}.gguf"
    exported = export_gguf(ckpt, gguf_file, base=ctx.gguf_path, progress=False)
    nbytes, weights, types = llama.block_linear_bits(gguf_file)
    in_llama = _ppl(llama.window_nll(gguf_file, ctx.windows, ctx.threads))
    return {"row": name, "tool": "sensiquant", "bits_per_param": 8 * nbytes / weights,
            "checkpoint_bits_per_param": report.bits_per_param, "block_linear_types": types,
            "ppl_sensiquant": ours, "ppl_llama_cpp": in_llama, "quantize_seconds": seconds,
            "export_seconds": exported["seconds"], "file_bytes": exported["bytes"]}


def reexport_row(name: str, ctx, out_dir: Path) -> dict:
    """``<row>@<embed type>``: the checkpoint a sensiquant row wrote, exported again with its embeddings (and tied
    head) in another type (llama.cpp's --pure files hold them in the block type), scored in llama.cpp."""
    from sensiquant.io.gguf_export import export_gguf

    base_row, embed = name.split("@")
    gguf_file = out_dir / f"sq-{base_row}-{embed}.gguf"
    exported = export_gguf(out_dir / f"sq-{base_row}", gguf_file, base=ctx.gguf_path, embed_type=embed,
                           progress=False)
    nbytes, weights, types = llama.block_linear_bits(gguf_file)
    return {"row": name, "tool": "sensiquant", "bits_per_param": 8 * nbytes / weights, "block_linear_types": types,
            "embed_type": embed, "ppl_llama_cpp": _ppl(llama.window_nll(gguf_file, ctx.windows, ctx.threads)),
            "export_seconds": exported["seconds"], "file_bytes": exported["bytes"]}


def llama_row(name: str, ctx) -> dict:
    run = llama.run(LLAMA_ROWS[name], ctx)
    return {"row": name, "tool": "llama.cpp", "setting": LLAMA_ROWS[name], "bits_per_param": run.bits_per_param,
            "ppl_llama_cpp": _ppl(run.nll), "quantize_seconds": run.quantize_seconds, **run.extra,
            "notes": run.notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model alias or path (default: SmolLM2-135M)")
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--work-dir", default=str(Path.home() / ".cache" / "sensiquant-peers" / "work"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=None, help="results file (default bench/results/gguf_export[_MODEL].json)")
    args = ap.parse_args()
    from sensiquant.io.models import DEFAULT_MODEL
    from sensiquant.serialize import write_text_atomic

    reason = llama.available()
    if reason:
        raise SystemExit(f"llama.cpp is not available: {reason}")
    model = args.model or DEFAULT_MODEL
    slug = "" if model == DEFAULT_MODEL else "_" + "".join(c if c.isalnum() or c == "." else "-" for c in model)
    work = Path(args.work_dir) / slug.lstrip("_") if slug else Path(args.work_dir)  # cached files are per model
    work.mkdir(parents=True, exist_ok=True)
    ctx = build_context(model, args.max_windows, 2048, args.calib_windows, work, args.data_dir)
    out = Path(args.out) if args.out else RESULTS / f"gguf_export{slug}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    results.update(model=model, max_windows=args.max_windows, calib_windows=args.calib_windows,
                   torch=torch.__version__, llama_cpp=llama.VERSION)
    for name in [r for r in args.rows.split(",") if r]:
        print(f"== {name}", flush=True)
        if "@" in name:
            row = reexport_row(name, ctx, work)
        else:
            row = sensiquant_row(name, ctx, work) if name in SENSIQUANT_ROWS else llama_row(name, ctx)
        print(json.dumps(row), flush=True)
        results["rows"] = [r for r in results["rows"] if r["row"] != name] + [row]
        write_text_atomic(out, json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
