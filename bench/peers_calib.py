"""Peers that tune their rounding on calibration data: Intel's AutoRound (SignRound).

Both get the harness's calibration windows (WikiText-2 validation, the same token ids as everyone) and quantize the
block linears only. AutoRound returns a fake-quantized ("qdq") model, which is scored in fp32; its bits/param are
those of its packed export (``auto_round`` / GPTQ layout: ``bits`` per weight, one FP16 scale and one ``bits``-wide
zero point per group; groups that do not divide the row are padded, as the export pads them).
"""

from __future__ import annotations

import math
import time

import torch

from bench.peer_api import Peer, PeerContext, PeerRun, block_linear_names, dist_version, missing

AUTOROUND_SETTINGS = {
    # setting -> (scheme, group size, iters, calibration sample length). 50 iterations is AutoRound's "light" recipe,
    # 0 its documented RTN mode (--iters 0). Its default, 200 iterations, was not run: about 4 hours on 2 CPU cores
    # here. The light runs cut the same calibration tokens into samples of 512 (a 2048-token batch costs 4x more
    # per iteration).
    "W4A16-g128-rtn": ("W4A16", 128, 0, None),
    "W3A16-g128-rtn": ("W3A16", 128, 0, None),
    "W4A16-g128-light": ("W4A16", 128, 50, 512),
    "W3A16-g128-light": ("W3A16", 128, 50, 512),
}


def _export_bits(out_f: int, in_f: int, bits: int, group: int) -> int:
    """Bits of one linear in the packed GPTQ-style export: codes, one FP16 scale and one packed zero per group."""
    groups = math.ceil(in_f / group)
    return out_f * in_f * bits + out_f * groups * (16 + bits)


def run_autoround(setting: str, ctx: PeerContext) -> PeerRun:
    from auto_round import AutoRound

    scheme, group, iters, sample_len = AUTOROUND_SETTINGS[setting]
    model, tok = ctx.load_base()
    names = block_linear_names(model)
    windows = ctx.calib_windows
    if sample_len and windows.shape[1] > sample_len:
        windows = windows[:, :windows.shape[1] // sample_len * sample_len].reshape(-1, sample_len)
    calib = [{"input_ids": row[None], "attention_mask": torch.ones_like(row[None])} for row in windows]
    start = time.perf_counter()
    tuner = AutoRound(model, tok, scheme=scheme, group_size=group, iters=iters, dataset=calib,
                      nsamples=len(calib), seqlen=windows.shape[1], batch_size=min(8, len(calib)),
                      device_map="cpu", seed=0)
    model, layer_config = tuner.quantize()
    seconds = time.perf_counter() - start
    # the qdq weights, scored in fp32 like every other peer (transformers refuses .float() on a model that carries a
    # quantization config, so the tensors are cast one by one)
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.float()
    model.eval()
    params = total_bits = 0
    for name in names:
        weight = model.get_submodule(name).weight
        out_f, in_f = weight.shape
        cfg = layer_config.get(name, {})
        bits = int(cfg.get("bits", 16))
        total_bits += out_f * in_f * 16 if bits >= 16 else _export_bits(out_f, in_f, bits, int(cfg["group_size"]))
        params += out_f * in_f
    kept = sum(1 for n in names if int(layer_config.get(n, {}).get("bits", 16)) >= 16)
    note = f"iters={iters}, {len(calib)} calibration samples of {windows.shape[1]} tokens; qdq model"
    if kept:
        note += f"; {kept} block linears left unquantized (counted at 16 bits)"
    return PeerRun(total_bits / params, params, seconds, model=model, tokenizer=tok, notes=note)


PEERS = [
    Peer("autoround", list(AUTOROUND_SETTINGS), lambda: missing("auto-round", "auto_round"), run_autoround,
         dist_version("auto-round")),
]
