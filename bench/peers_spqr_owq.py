"""SpQR (Dettmers et al. 2023) and OWQ (Lee et al., AAAI 2024) as their authors' code runs them, on the CPU.

Neither is a package: both run from local checkouts of their GitHub repositories at pinned commits, outside this
repository (``bash bench/peers_spqr_owq_setup.sh``; paths ``$SENSIQUANT_SPQR_SRC`` and ``$SENSIQUANT_OWQ_SRC``,
default ``~/.cache/sensiquant-peers/SpQR`` and ``.../owq``). Nothing of theirs is copied here. The adapter loads each
repository's ``main.py`` as a module and calls its own quantization driver, the function its command line calls:
SpQR's ``quantize_spqr`` (``SPQRUtil`` of ``spqr_engine.py`` with ``quant_groups.py``), OWQ's ``layerwise_quantize``
(``GPTQ_OWQ`` of ``owq/recon.py`` with ``owq/quant.py``): sequential, block by block, each block's inputs the outputs
of the already quantized blocks before it, every linear of a block quantized from the Hessian of that block's
inputs. Both get the harness's calibration windows instead of their own loaders, quantize the block linears in
fp32 (their GPU runs use fp16), and return the model with the quantize-dequantized weights, scored in fp32.

Run-time shims (monkeypatches in this process only; their files are not modified), also in each row's notes:

* both: the data-loading module their ``main.py`` imports (``datautils`` / ``owq.utils.datautils``, which needs
  HF ``datasets``) is a stub while ``main.py`` loads; the harness supplies the calibration tokens.
* SpQR: its input catcher (``get_inps``) keeps only ``attention_mask``; transformers >= 4.48 llama layers also need
  ``position_embeddings`` (rotary cos/sin), added from the model's own ``rotary_emb``. ``SPQRUtil.quantize`` is
  wrapped to read each linear's outlier count (no change to what it computes). Its ``--skip_out_loss``: the
  per-block output-error log it skips assumes the tuple decoder layers returned before transformers 5 (a log
  only; without it the run stops on a tensor it cannot ``.item()``). Device ``cpu``, as its ``main``
  picks without CUDA; its ``torch.cuda.empty_cache`` / ``max_memory_allocated`` are harmless on CPU torch.
* OWQ: ``torch.cuda.synchronize`` (called unconditionally in ``fasterquant``; CPU torch raises) is a no-op;
  ``position_embeddings`` is added to the llama entry of its ``model_config.json`` (``inp_kwargs``, in memory), the
  file its README says to extend for new models; its ``main`` hardcodes ``cuda:0``, the adapter passes ``cpu``.

Settings. SpQR: the README's LLaMA recipe (``--perchannel --qq_scale_bits 3 --qq_zero_bits 3 --qq_groupsize 16
--outlier_threshold 0.2 --permutation_order act_order --percdamp 1e0``; the README runs it at ``--wbits 4
--groupsize 16``, ~4.7-5.0 bits/param here) at ``--wbits 3 --groupsize 16`` (~3.7-4.0), and with 32-wide first-level
groups at 3 and 4 bits (~3.4-3.7 and ~4.4-4.7; the outlier share, 0-1% at 32 bits each, decides where in the
range). OWQ: the README's ``--wbits 3 --target_bit 3.01`` and ``--wbits 4 --target_bit 4.01``
(per-channel, ``--tuning mse`` default, no act-order, FP16 weak columns spread over the layers by its
``model_config.json`` ratios: 2 per attention linear and per down_proj of SmolLM2, none in gate/up; ~3.05 and ~4.05
bits/param here), and the same with its ``--groupsize`` 32 / 64 (~3.64 and ~4.33), for the 3.6 and 4.3 points.

Bits/param (all stored bits of the block linears over their weights):

* SpQR, per linear (m outputs, n inputs, bits b, first-level groups of g inputs per row, statistics of 3 bits,
  second-level groups of 16 rows): b·m·n codes (outliers keep their dense code too, as in its format), 2·3 bits per
  (row, group) for the quantized scale and zero, 4·16 bits per (16 rows, group) for the FP16 scale and zero of
  each of the two second-level quantizers, 32 bits per outlier (16-bit value + 16-bit column, its ``col_vals``),
  32·(m+1) bits of CSR row offsets and 32·n bits of the act-order input permutation (``row_offsets`` and
  ``in_perm``, int32 in its ``inference.py`` format). Its own ``get_average_number_of_bits`` (main.py's count:
  codes, both statistic levels and 32 bits per outlier, no row offsets and permutation) is kept in ``extra``.
* OWQ, per linear: its packed ``QuantLinear`` (``owq/quant.py``): b bits for every weight, weak columns included
  (``qweight``, whole 32-input packs), an FP16 scale and a 4-bit zero per row (``scales``, ``zeros``), the weak
  columns in FP16 (``oweight``) and their int32 indices (``outlieridx``). With ``--groupsize`` (which its packing
  does not support) the same layout with one scale and zero per group of the non-weak columns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from unittest import mock

import torch

from bench.peer_api import Peer, PeerContext, PeerRun, block_linear_names

CACHE = Path(os.environ.get("SENSIQUANT_PEERS_CACHE", Path.home() / ".cache" / "sensiquant-peers"))
SPQR_SRC = Path(os.environ.get("SENSIQUANT_SPQR_SRC", CACHE / "SpQR"))
OWQ_SRC = Path(os.environ.get("SENSIQUANT_OWQ_SRC", CACHE / "owq"))
SPQR_COMMIT = "543d10e56f921e5eeb10d5f0aaaccd30b6662d0e"  # the same pins as bench/peers_spqr_owq_setup.sh
OWQ_COMMIT = "03cfc9941cfbe951ca7dbc614c66bc625fbb9857"

# the README recipe's fixed part; the settings vary the bits and the first-level group
SPQR_RECIPE = dict(perchannel=True, qq_scale_bits=3, qq_zero_bits=3, qq_groupsize=16, outlier_threshold=0.2,
                   permutation_order="act_order", percdamp=1.0, sym=False, round_zero=None, qq_zero_sym=False,
                   true_sequential=False, simplified_outliers=False, offload_activations=False, skip_out_loss=True,
                   wandb=False, save=False)
SPQR_SETTINGS = {"w3g16": dict(wbits=3, groupsize=16), "w3g32": dict(wbits=3, groupsize=32),
                 "w4g32": dict(wbits=4, groupsize=32)}
OWQ_SETTINGS = {"w3-t3.01": dict(wbits=3, target_bit=3.01), "w4-t4.01": dict(wbits=4, target_bit=4.01),
                "w3g32-t3.01": dict(wbits=3, target_bit=3.01, groupsize=32),
                "w4g64-t4.01": dict(wbits=4, target_bit=4.01, groupsize=64)}


def _available(src: Path, marker: str) -> str | None:
    if not (src / marker).is_file():
        return f"no checkout at {src} (bash bench/peers_spqr_owq_setup.sh; or set the path's env variable)"
    return None


def _version(src: Path, pinned: str) -> str:
    probe = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True)
    head = probe.stdout.strip() if probe.returncode == 0 else "unknown"
    return f"git {head[:10]}" + ("" if head == pinned else f" (not the pinned {pinned[:10]})")


def _load_main(src: Path, name: str, stub: str):
    """Their ``main.py`` as module ``name``, with ``stub`` (their dataset loaders) standing in while it loads. The
    checkout goes at the end of sys.path: it shadows no installed package."""
    saved = sys.modules.get(stub)
    sys.modules[stub] = types.ModuleType(stub)
    sys.modules[stub].get_loaders = None  # the one name SpQR imports from it; OWQ star-imports it
    if str(src) not in sys.path:
        sys.path.append(str(src))
    try:
        spec = importlib.util.spec_from_file_location(name, src / "main.py")
        module = importlib.util.module_from_spec(spec)
        with contextlib.redirect_stdout(sys.stderr):  # OWQ prints that its CUDA kernel is not installed
            spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop(stub, None)
        else:
            sys.modules[stub] = saved
    return module


def spqr_bits(out_f: int, in_f: int, bits: int, group: int, outliers: int, qq_group: int = 16,
              stat_bits: int = 3) -> int:
    """Stored bits of one SpQR linear (see the module docstring)."""
    groups = math.ceil(in_f / group)
    return (out_f * in_f * bits + groups * out_f * 2 * stat_bits + groups * math.ceil(out_f / qq_group) * 4 * 16
            + 32 * outliers + 32 * (out_f + 1) + 32 * in_f)


def owq_bits(out_f: int, in_f: int, bits: int, weak: int, group: int = -1) -> int:
    """Stored bits of one OWQ linear in its packed layout (see the module docstring)."""
    groups = 1 if group <= 0 else math.ceil((in_f - weak) / group)
    return out_f * math.ceil(in_f / 32) * 32 * bits + out_f * groups * (16 + 4) + weak * (out_f * 16 + 32)


def run_spqr(setting: str, ctx: PeerContext) -> PeerRun:
    main = _load_main(SPQR_SRC, "spqr_main", "datautils")
    cfg = {**SPQR_RECIPE, **SPQR_SETTINGS[setting]}
    model, tok = ctx.load_base()
    names = block_linear_names(model)
    windows = ctx.calib_windows
    model.seqlen = windows.shape[1]  # what its get_model sets (2048)
    args = types.SimpleNamespace(**cfg, nsamples=len(windows))
    get_inps = main.get_inps

    def get_inps_with_rope(model, data, args, dev, nsamples=None):
        inps, forward_args = get_inps(model, data, args, dev, nsamples)
        positions = torch.arange(inps.shape[1], device=inps.device)[None]
        forward_args["position_embeddings"] = model.model.rotary_emb(inps[:1], positions)
        return inps, forward_args

    outliers: dict[int, int] = {}
    quantize = main.SPQRUtil.quantize

    def quantize_counting(self, **kwargs):
        result = quantize(self, **kwargs)
        outliers[id(self.layer)] = int(result.unstructured_outlier_mask.sum())
        return result

    torch.manual_seed(0)
    with (mock.patch.object(main, "get_inps", get_inps_with_rope),
          mock.patch.object(main.SPQRUtil, "quantize", quantize_counting),
          contextlib.redirect_stdout(sys.stderr)):  # its progress prints; the harness reads stdout
        start = time.perf_counter()
        _, paper_bits = main.quantize_spqr(model, [w[None] for w in windows], args, "cpu")
        seconds = time.perf_counter() - start
    model.eval()
    params = total_bits = count = 0
    for name in names:
        layer = model.get_submodule(name)
        out_f, in_f = layer.weight.shape
        count += outliers[id(layer)]  # a KeyError here: a block linear SpQR did not quantize
        total_bits += spqr_bits(out_f, in_f, cfg["wbits"], cfg["groupsize"], outliers[id(layer)])
        params += out_f * in_f
    note = (f"SpQR README recipe at w{cfg['wbits']} g{cfg['groupsize']} (3-bit stats in groups of 16, outlier "
            f"threshold 0.2, act_order, percdamp 1); {count / params:.3%} outliers; {len(windows)} calibration "
            f"windows of {windows.shape[1]} tokens; shims: datautils stub, position_embeddings added to its "
            "get_inps, --skip_out_loss; qdq model")
    return PeerRun(total_bits / params, params, seconds, model=model, tokenizer=tok, notes=note,
                   extra={"outlier_share": count / params, "paper_bits_per_param": paper_bits})


def run_owq(setting: str, ctx: PeerContext) -> PeerRun:
    main = _load_main(OWQ_SRC, "owq_main", "owq.utils.datautils")
    cfg = {"target_bit": None, "target_rank": None, "groupsize": -1, **OWQ_SETTINGS[setting]}
    model, tok = ctx.load_base()
    if model.config.model_type not in ("llama", "qwen2", "mistral"):
        raise ValueError(f"OWQ's llama entry of model_config.json does not fit a {model.config.model_type} model")
    names = block_linear_names(model)
    windows = ctx.calib_windows
    # its argparse defaults for everything the README commands do not set; 'llama' picks its model_config.json entry
    args = types.SimpleNamespace(**cfg, model="llama", tuning="mse", no_frob_norm=False, percdamp=0.01, dtype=None,
                                 layers=None, sym=False, nearest=False, save="", fake=False, packing=False,
                                 act_order=False, true_sequential=False, seed=0, nsamples=len(windows),
                                 seqlen=windows.shape[1])
    with contextlib.chdir(OWQ_SRC), contextlib.redirect_stdout(sys.stderr):  # it reads ./model_config.json
        meta = main.processing_arguments(args)
    meta["inp_kwargs"] = [*meta["inp_kwargs"], "position_embeddings"]
    args.meta = meta
    main.seed_all(args.seed)
    with (mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None),
          contextlib.redirect_stdout(sys.stderr)):
        start = time.perf_counter()
        quantizers = main.layerwise_quantize(model, [(w[None],) for w in windows], torch.device("cpu"), args)
        seconds = time.perf_counter() - start
    model.eval()
    params = total_bits = weak = 0
    for name in names:
        out_f, in_f = model.get_submodule(name).weight.shape
        n_out = quantizers[name].n_out  # a KeyError here: a block linear OWQ did not quantize
        total_bits += owq_bits(out_f, in_f, cfg["wbits"], n_out, cfg["groupsize"])
        weak += n_out * out_f
        params += out_f * in_f
    spec = f"--target_bit {cfg['target_bit']}" if cfg["target_bit"] else f"--target_rank {cfg['target_rank']}"
    group = f" --groupsize {cfg['groupsize']}" if cfg["groupsize"] > 0 else ""
    note = (f"OWQ --wbits {cfg['wbits']} {spec}{group} (tuning mse); {weak / params:.3%} of weights in FP16 weak "
            f"columns; {len(windows)} calibration windows of {windows.shape[1]} tokens; shims: datautils stub, "
            "torch.cuda.synchronize no-op, position_embeddings in its llama inp_kwargs; qdq model")
    return PeerRun(total_bits / params, params, seconds, model=model, tokenizer=tok, notes=note,
                   extra={"weak_share": weak / params})


PEERS = [
    Peer("spqr", list(SPQR_SETTINGS), lambda: _available(SPQR_SRC, "spqr_engine.py"), run_spqr,
         lambda: _version(SPQR_SRC, SPQR_COMMIT)),
    Peer("owq", list(OWQ_SETTINGS), lambda: _available(OWQ_SRC, "owq/recon.py"), run_owq,
         lambda: _version(OWQ_SRC, OWQ_COMMIT)),
]
