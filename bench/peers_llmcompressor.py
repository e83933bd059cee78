"""GPTQ and AWQ as their maintained toolkit runs them: vLLM's llm-compressor (``oneshot`` with ``GPTQModifier`` /
``AWQModifier``, the sequential pipeline), on the CPU.

llm-compressor 0.14.0.1 needs transformers <= 5.17 while sensiquant runs on 5.24, so it lives in its own virtual
environment (``bash bench/peers_llmcompressor_setup.sh``: system packages visible, torch 2.13.0 kept, transformers
5.17 and llm-compressor installed inside); the harness runs this peer's settings with that interpreter. Both get
the harness's calibration windows (WikiText-2 validation token ids, as everyone) and quantize the block linears
(lm_head and the embeddings stay as they are). The quantize-dequantized weights their model computes with are read
out into a fresh base model (``_plain_model``), which is scored in fp32 (and in bf16 for zero-shot). Bits/param
are those of compressed-tensors' ``pack-quantized`` checkpoint: codes packed densely into int32 along the row, one
16-bit scale per group, and for asymmetric schemes one zero point per group, packed densely along the output
dimension.

Groups of 64: SmolLM2's 576-wide inputs are not a multiple of 128, and llm-compressor refuses groups that do not
divide the row (it would need ``bypass_divisibility_checks`` and a runtime that pads).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import torch

from bench.peer_api import Peer, PeerContext, PeerRun, block_linear_names

VENV = Path(os.environ.get("SENSIQUANT_PEERS_CACHE", Path.home() / ".cache" / "sensiquant-peers")) / "llmc-venv"
PYTHON = VENV / "bin" / "python"
VERSION = "0.14.0.1"

# setting -> (algorithm, bits, group size, symmetric): GPTQ with its default symmetric int scheme (W4A16 is
# symmetric int4), AWQ with the asymmetric one its examples use (W4A16_ASYM)
SETTINGS = {
    "W4A16-g64-gptq": ("gptq", 4, 64, True),
    "W3A16-g64-gptq": ("gptq", 3, 64, True),
    "W4A16-g64-awq": ("awq", 4, 64, False),
    "W3A16-g64-awq": ("awq", 3, 64, False),
}


def _available() -> str | None:
    if not PYTHON.is_file():
        return f"no llm-compressor environment at {VENV} (bash bench/peers_llmcompressor_setup.sh)"
    probe = subprocess.run([str(PYTHON), "-c", "import llmcompressor"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"llm-compressor does not import in {VENV}: {probe.stderr.strip().splitlines()[-1]}"
    return None


def _version() -> str:
    probe = subprocess.run([str(PYTHON), "-c", "from importlib import metadata as m; print(m.version('llmcompressor'),"
                            " m.version('compressed-tensors'), m.version('transformers'))"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return VERSION
    llmc, ct, tf = probe.stdout.split()
    return f"{llmc} (compressed-tensors {ct}, transformers {tf})"


def _packed_bits(out_f: int, in_f: int, bits: int, group: int, symmetric: bool) -> int:
    """Bits of one linear in compressed-tensors' pack-quantized layout (see the module docstring)."""
    groups = math.ceil(in_f / group)
    total = out_f * math.ceil(in_f * bits / 32) * 32 + out_f * groups * 16
    if not symmetric:
        total += groups * math.ceil(out_f * bits / 32) * 32
    return total


@torch.no_grad()
def _plain_model(quantized, ctx: PeerContext, names: list[str]):
    """A fresh base model whose block linears hold the weights ``quantized`` computes with (its quantize-dequantize
    forward read out on the identity: exact), so that the harness can score it like any transformers model.
    llm-compressor leaves its model dispatched through compressed-tensors' offloading wrappers, whose parameters
    ``.to(torch.bfloat16)`` does not reach: zero-shot scoring in bf16 failed on them with a dtype mismatch."""
    model, _ = ctx.load_base()
    for name in names:
        layer = quantized.get_submodule(name)
        y = layer(torch.eye(layer.in_features))  # (in, out): row k is W[:, k] (+ bias)
        if layer.bias is not None:
            y = y - layer.bias
        model.get_submodule(name).weight.copy_(y.t())
    return model.eval()


def run_llmcompressor(setting: str, ctx: PeerContext) -> PeerRun:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.awq import AWQModifier
    from llmcompressor.modifiers.quantization import GPTQModifier

    if not torch.cuda.is_available():
        # llm-compressor 0.14.0.1's AWQ pins the cached activations for host-to-device copies, which fails without
        # an accelerator ("Cannot access accelerator device"); on the CPU there is nothing to pin
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

    algorithm, bits, group, symmetric = SETTINGS[setting]
    model, tok = ctx.load_base()
    names = block_linear_names(model)
    group = math.gcd(group, *(model.get_submodule(n).in_features for n in names))  # tiny smoke models
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy="group", group_size=group)
    scheme = {"group_0": QuantizationScheme(targets=["Linear"], weights=args)}
    ignore = ["lm_head"]
    modifier = (GPTQModifier(config_groups=scheme, ignore=ignore) if algorithm == "gptq"
                else AWQModifier(config_groups=scheme, ignore=ignore))
    windows = ctx.calib_windows
    data = Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
    torch.manual_seed(0)
    start = time.perf_counter()
    model = oneshot(model=model, tokenizer=tok, dataset=data, recipe=modifier, max_seq_length=windows.shape[1],
                    num_calibration_samples=len(windows), shuffle_calibration_samples=False, pipeline="sequential")
    seconds = time.perf_counter() - start
    model = _plain_model(model, ctx, names)
    params = total_bits = 0
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        total_bits += _packed_bits(out_f, in_f, bits, group, symmetric)
        params += out_f * in_f
    note = (f"{algorithm} {'sym' if symmetric else 'asym'} int{bits} g{group}, sequential pipeline, "
            f"{len(windows)} calibration windows of {windows.shape[1]} tokens; qdq model")
    return PeerRun(total_bits / params, params, seconds, model=model, tokenizer=tok, notes=note)


PEERS = [Peer("llm-compressor", list(SETTINGS), _available, run_llmcompressor, _version, python=lambda: str(PYTHON))]
