"""Resume after an interruption: a run that writes a checkpoint keeps its finished work in a hidden sibling of the
checkpoint directory (``.NAME.sensiquant-resume``): the gradient statistics once the gradient pass is done, then
each finished block's quantized layers. Every file is written whole (a temporary, flushed, renamed), so a process
killed at any point leaves only complete files behind. Rerunning the same job (same model weights, config and
sensiquant version) reads them back and goes on from the first unfinished block; everything after is recomputed
from the same inputs, so the checkpoint is bit-identical to an uninterrupted run's. The folder of another job is
replaced, and the folder is removed once the checkpoint is in place."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import SensiquantError
from ..serialize import atomic_file, write_text_atomic

RESUME_VERSION = 1
JOB = "job.json"
GRADIENTS = "gradients.safetensors"
FAULT_ENV = "SENSIQUANT_FAULT"  # tests: "gradients" or "block:N" kills the process (SIGKILL) right after that save;
# a "+term" suffix ("block:0+term") sends SIGTERM instead
_SEP = "::"  # layer name :: tensor name, in the block files


def resume_dir(out_dir: str | os.PathLike) -> Path:
    """Where the run writing the checkpoint ``out_dir`` keeps its finished work."""
    out = Path(os.path.realpath(os.fspath(out_dir)))
    return out.parent / f".{out.name}.sensiquant-resume"


def model_fingerprint(layers: dict[str, nn.Linear]) -> str:
    """A digest of the layers' names, shapes and a strided sample of their weights: another model, or the same
    model with other weights, gets another fingerprint."""
    digest = hashlib.sha256()
    for name, layer in layers.items():
        w = layer.weight.detach()
        digest.update(f"{name}:{tuple(w.shape)}:{w.dtype}".encode())
        digest.update(w.reshape(-1)[::97].float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def fault_point(point: str) -> None:
    """Tests: stop the process here when :data:`FAULT_ENV` names ``point``."""
    wanted = os.environ.get(FAULT_ENV, "")
    if wanted in (point, point + "+term"):
        os.kill(os.getpid(), signal.SIGTERM if wanted.endswith("+term") else signal.SIGKILL)


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a state file and what was recorded with them, in one read."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads((f.metadata() or {}).get("resume", "{}"))


def join_scores(abs_sum: dict[str, torch.Tensor], sq_sum: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One flat tensor dict of per-layer gradient scores (``layer::abs``, ``layer::sq``), as they are stored."""
    return {f"{n}::abs": t for n, t in abs_sum.items()} | {f"{n}::sq": t for n, t in sq_sum.items()}


def split_scores(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`join_scores` undone, by layer: {"grad_abs_sum": ..., "grad_sq_sum": ...}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, kind = key.rpartition("::")
        out.setdefault(name, {})["grad_abs_sum" if kind == "abs" else "grad_sq_sum"] = value
    return out


def discard(root: str | os.PathLike) -> None:
    """Drop whatever state is kept in ``root`` (nothing there is fine)."""
    if os.path.lexists(root):
        shutil.rmtree(root, ignore_errors=True)


class ResumeState:
    """The finished work of one job in ``root``; :meth:`open` starts it or picks it up."""

    def __init__(self, root: Path, job: dict):
        self.root, self.job = root, job
        self.resumed: list[str] = []  # what was read back, for the report

    @classmethod
    def open(cls, root: str | os.PathLike, config_dict: dict, layers: dict[str, nn.Linear] | None = None,
             fingerprint: str | None = None) -> ResumeState:
        """The state of the job (``config_dict`` on the model holding ``layers``, or the model of
        ``fingerprint``) in ``root``: what an earlier run of the same job left, or a fresh folder (anything another
        job left there is removed)."""
        from .. import __version__

        root = Path(root)
        job = {"resume_version": RESUME_VERSION, "sensiquant": __version__, "config": config_dict,
               "model": fingerprint if fingerprint is not None else model_fingerprint(layers)}
        job_file = root / JOB
        try:
            if root.is_dir():
                try:
                    same = json.loads(job_file.read_text()) == json.loads(json.dumps(job))
                except (OSError, ValueError):
                    same = False
                if same:
                    return cls(root, job)
                discard(root)
            root.mkdir(parents=True)
            write_text_atomic(job_file, json.dumps(job, indent=1, sort_keys=True))
        except OSError as exc:
            raise SensiquantError(f"cannot keep the resume state in {root}: {exc.strerror}") from None
        return cls(root, job)

    # gradient statistics -------------------------------------------------------------------------------------
    def gradients(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict] | None:
        """(sum |g|, sum g^2, {"seconds", "loss"}) per layer from the earlier run, or None."""
        path = self.root / GRADIENTS
        if not path.is_file():
            return None
        tensors, meta = _load(path)
        abs_sum = {k[: -len("::abs")]: v for k, v in tensors.items() if k.endswith("::abs")}
        sq_sum = {k[: -len("::sq")]: v for k, v in tensors.items() if k.endswith("::sq")}
        self.resumed.append("gradients")
        return abs_sum, sq_sum, meta

    def save_gradients(self, abs_sum: dict[str, torch.Tensor], sq_sum: dict[str, torch.Tensor], meta: dict) -> None:
        self._write(join_scores(abs_sum, sq_sum), self.root / GRADIENTS, meta)
        fault_point("gradients")

    # gradient statistics of a streamed run, block by block ---------------------------------------------------
    def save_block_gradients(self, i: int, abs_sum: dict[str, torch.Tensor], sq_sum: dict[str, torch.Tensor]
                             ) -> None:
        self._write(join_scores(abs_sum, sq_sum), self.root / f"gradients-{i:05d}.safetensors", {})

    def finish_streamed_gradients(self, meta: dict) -> None:
        """Mark every block's scores as written (``meta``: the pass's seconds and loss)."""
        self._write({}, self.root / GRADIENTS, meta)
        fault_point("gradients")

    def streamed_gradients_done(self) -> dict | None:
        """What the finished streamed gradient pass recorded, or None when it did not finish."""
        path = self.root / GRADIENTS
        if not path.is_file():
            return None
        self.resumed.append("gradients")
        return _load(path)[1]

    def block_gradients(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        """Block ``i``'s scores by layer: {"grad_abs_sum": ..., "grad_sq_sum": ...}."""
        return split_scores(_load(self.root / f"gradients-{i:05d}.safetensors")[0])

    # blocks --------------------------------------------------------------------------------------------------
    def _block_path(self, i: int) -> Path:
        return self.root / f"block-{i:05d}.safetensors"

    def has_block(self, i: int) -> bool:
        return self._block_path(i).is_file()

    def block(self, i: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """Block ``i``'s stored tensors by layer, and what was recorded with them."""
        tensors, meta = _load(self._block_path(i))
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            layer, _, name = key.rpartition(_SEP)
            by_layer.setdefault(layer, {})[name] = value
        self.resumed.append(f"block {i}")
        return by_layer, meta

    def save_block(self, i: int, tensors: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
        flat = {f"{layer}{_SEP}{name}": t for layer, ts in tensors.items() for name, t in ts.items()}
        self._write(flat, self._block_path(i), meta)
        fault_point(f"block:{i}")

    def _write(self, tensors, path: Path, meta: dict) -> None:
        try:
            with atomic_file(path) as tmp:
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                          metadata={"resume": json.dumps(meta)})
        except OSError as exc:
            raise SensiquantError(f"cannot keep the resume state in {self.root}: {exc.strerror}") from None

    def remove(self) -> None:
        """Drop the state (the checkpoint it was for is complete)."""
        discard(self.root)
