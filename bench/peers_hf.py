"""Peers that quantize a transformers model in place: the hqq package, optimum-quanto, bitsandbytes and torchao.

Each at its documented default/recommended weight-only settings, applied to the block linears only (lm_head and
embeddings stay as they are for everyone). Bits/param count the bytes each tool keeps for those linears; where a
tool keeps metadata in the compute dtype, the note says how it was counted.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from bench.peer_api import Peer, PeerContext, PeerRun, block_linear_names, dist_version, missing, tensor_bytes


def _replace_linears(model: nn.Module, names: list[str], make) -> float:
    """Swap every named linear for make(linear); returns the seconds it took."""
    from sensiquant.runtime import set_module

    start = time.perf_counter()
    for name in names:
        set_module(model, name, make(model.get_submodule(name)))
    return time.perf_counter() - start


def _weights(model: nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() for n in names)


# ------------------------------------------------------------------------------------------------------------ hqq
def run_hqq(setting: str, ctx: PeerContext) -> PeerRun:
    """hqq package, BaseQuantizeConfig(nbits, group_size) defaults (axis 1, optimize on, round_zero at 4 bits).
    Meta (scale, zero) live in the compute dtype; fp32 here for a clean comparison, counted at 16 bits as with the
    package's default fp16 compute dtype."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    nbits, group = {"b4g64": (4, 64), "b3g64": (3, 64), "b4g128": (4, 128), "b2g32": (2, 32)}[setting]
    model, tok = ctx.load_base()
    names = block_linear_names(model)
    params = _weights(model, names)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    config = BaseQuantizeConfig(nbits=nbits, group_size=group)
    seconds = _replace_linears(model, names, lambda lin: HQQLinear(lin, config, compute_dtype=torch.float32,
                                                                   device="cpu"))
    nbytes = 0
    for name in names:
        layer = model.get_submodule(name)
        nbytes += tensor_bytes(layer.W_q) + 2 * (layer.meta["scale"].numel() + layer.meta["zero"].numel())
        if layer.bias is not None:
            nbytes += 0  # biases are not weights of the linears; nobody counts them
    return PeerRun(8 * nbytes / params, params, seconds, model=model, tokenizer=tok,
                   notes="meta counted at 16 bits (package default compute dtype fp16)")


# -------------------------------------------------------------------------------------------------------- quanto
def run_quanto(setting: str, ctx: PeerContext) -> PeerRun:
    """optimum-quanto weight-only: quantize(model, weights=qintN, exclude lm_head) + freeze (its default group
    size, 128 for 2/4-bit, per-channel for 8-bit)."""
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    qtype = {"qint4": qint4, "qint2": qint2, "qint8": qint8}[setting]
    model, tok = ctx.load_base()
    names = block_linear_names(model)
    params = _weights(model, names)
    start = time.perf_counter()
    quantize(model, weights=qtype, exclude=["lm_head"])
    freeze(model)
    seconds = time.perf_counter() - start
    nbytes = sum(tensor_bytes(model.get_submodule(n).weight) for n in names)
    return PeerRun(8 * nbytes / params, params, seconds, model=model, tokenizer=tok,
                   notes="bytes of the frozen weight tensors (codes, scale, shift)")


# -------------------------------------------------------------------------------------------------- bitsandbytes
def run_bnb(setting: str, ctx: PeerContext) -> PeerRun:
    """bitsandbytes on CPU: NF4 (Linear4bit / Params4bit defaults: blocks of 64, absmax double-quantized to 8 bits;
    the second-level constants, ~0.002 bits/param, are not counted) and LLM.int8 (Linear8bitLt, per-row scales)."""
    import bitsandbytes as bnb

    model, tok = ctx.load_base()
    names = block_linear_names(model)
    params = _weights(model, names)

    def nf4(lin: nn.Linear) -> nn.Module:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                compute_dtype=torch.float32, quant_type="nf4", device="cpu")
        new.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
        new.bias = lin.bias
        return new.to("cpu")  # quantizes

    def int8(lin: nn.Linear) -> nn.Module:
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, device="cpu")
        new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        new.bias = lin.bias
        return new.to("cpu")

    seconds = _replace_linears(model, names, {"nf4": nf4, "int8": int8}[setting])
    nbytes = 0
    for name in names:
        w = model.get_submodule(name).weight
        nbytes += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        if state is not None:
            nbytes += tensor_bytes(state.absmax)
        scb = getattr(w, "SCB", None)
        if scb is not None:
            nbytes += tensor_bytes(scb)
    return PeerRun(8 * nbytes / params, params, seconds, model=model, tokenizer=tok)


# ------------------------------------------------------------------------------------------------------- torchao
def run_torchao(setting: str, ctx: PeerContext) -> PeerRun:
    """torchao quantize_: Int4WeightOnlyConfig (group 128, its default; the CPU "opaque" packing, which takes only
    the default tinygemm parameter choice, not HQQ) and IntxWeightOnlyConfig (int2/int3 per group of 32, the
    CPU/ExecuTorch recipe; stored unpacked in int8 on CPU, counted as stored)."""
    from torchao.quantization import Int4WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    model, tok = ctx.load_base()
    names = set(block_linear_names(model))
    params = _weights(model, list(names))
    if setting == "int4-g128":
        try:
            config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                          int4_choose_qparams_algorithm="hqq")
            quantize_(nn.Sequential(nn.Linear(128, 16)).to(torch.bfloat16), config)
        except Exception as exc:
            raise RuntimeError("torchao Int4WeightOnlyConfig has no CPU path in this version (tile_packed_to_4d needs "
                               f"CUDA, plain needs mslk): {str(exc).splitlines()[0]}") from exc
        model = model.to(torch.bfloat16)
    else:
        dtype = {"intx-int3-g32": torch.int3, "intx-int2-g32": torch.int2, "intx-int4-g32": torch.int4}[setting]
        config = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(32))
    start = time.perf_counter()
    quantize_(model, config, filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn in names)
    seconds = time.perf_counter() - start
    nbytes = sum(tensor_bytes(model.get_submodule(n).weight) for n in names)
    note = "bf16 activations (the int4 CPU kernel's dtype)" if setting.startswith("int4") else \
        "int8-unpacked storage on CPU"
    return PeerRun(8 * nbytes / params, params, seconds, model=model, tokenizer=tok, notes=note)


PEERS = [
    Peer("hqq", ["b4g64", "b3g64"], lambda: missing("hqq", "hqq"), run_hqq, dist_version("hqq")),
    Peer("optimum-quanto", ["qint4", "qint2"], lambda: missing("optimum-quanto", "optimum.quanto"), run_quanto,
         dist_version("optimum-quanto")),
    Peer("bitsandbytes", ["nf4", "int8"], lambda: missing("bitsandbytes", "bitsandbytes"), run_bnb,
         dist_version("bitsandbytes")),
    Peer("torchao", ["int4-g128", "intx-int4-g32", "intx-int3-g32", "intx-int2-g32"],
         lambda: missing("torchao", "torchao"), run_torchao, dist_version("torchao")),
]
