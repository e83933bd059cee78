"""Several processes (``torchrun --nproc-per-node N -m sensiquant quantize ...``): each rank calibrates on its share
of the windows (every N-th), and every sum is all-reduced, so each rank holds the statistics one process would have
computed (to floating-point rounding: the same terms, added in another order) and quantizes alike; rank 0 writes.
Gloo on the CPU, NCCL on GPUs. With one process every function here is a no-op."""

from __future__ import annotations

import atexit
import os
import time

import torch
import torch.distributed as dist

from ..errors import SensiquantError


def init_from_env() -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), once."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    atexit.register(_leave)


def _leave() -> None:
    """Destroy the process group while the interpreter is still alive (torch asks for it before exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _settled(op, t: torch.Tensor, *args) -> None:
    """Run the collective ``op(t, *args)`` and return once its worker thread has let go of ``t``.

    Gloo's worker drops its references to the tensors after the caller's wait has returned, and that drop takes the
    GIL; a worker still queued for the GIL when the interpreter finalizes aborts the process ("terminate called
    without an active exception", a rank lost after its work succeeded). Waiting here, with the GIL released, for
    ``t``'s use count to come back closes that window."""
    before = t._use_count()
    op(t, *args)
    if dist.get_backend() != "gloo":  # NCCL's watchdog releases its works on its own schedule
        return
    deadline = time.monotonic() + 60
    while t._use_count() > before and time.monotonic() < deadline:
        time.sleep(1e-4)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this process writes (and prints): rank 0, or the only process."""
    return rank() == 0


def shard(windows):
    """This rank's share of the calibration windows (a tensor of windows or a list of input dicts): every
    ``world_size``-th, starting at its rank."""
    n, world = len(windows), world_size()
    if world == 1:
        return windows
    if n < world:
        raise SensiquantError(f"{n} calibration windows cannot be shared by {world} processes: give at least {world}")
    return windows[rank()::world]


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks (in float32 or wider, returned in ``t``'s dtype)."""
    if world_size() == 1:
        return t
    buf = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous()
    _settled(dist.all_reduce, buf)
    return buf.to(t.dtype)


def all_mean(mean: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
    """Combine per-rank running means over ``count`` rows each into the mean over all rows, and the total count."""
    if world_size() == 1:
        return mean, count
    total = int(all_sum(torch.tensor(float(count), dtype=torch.float64)))
    if total == 0:
        return mean, 0
    return all_sum(mean * (count / total)), total


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, src: int, error: str | None = None
                      ) -> dict[str, torch.Tensor]:
    """Rank ``src``'s ``tensors`` on every rank (a JSON header of names, dtypes and shapes, then one buffer of their
    bytes). ``error``, given on ``src``, is raised as a :class:`SensiquantError` on every rank instead, so that one
    rank's failure never leaves the others waiting."""
    if world_size() == 1:
        if error is not None:
            raise SensiquantError(error)
        return tensors
    import json

    device = _comm_device()
    header = b""
    if rank() == src:
        items = {} if error is not None else tensors
        header = json.dumps({"error": error, "tensors": [[k, str(v.dtype).removeprefix("torch."), list(v.shape)]
                                                          for k, v in items.items()]}).encode()
    size = torch.tensor([len(header)], dtype=torch.int64, device=device)
    _settled(dist.broadcast, size, src)
    buf = (torch.frombuffer(bytearray(header), dtype=torch.uint8).to(device) if rank() == src
           else torch.empty(int(size), dtype=torch.uint8, device=device))
    _settled(dist.broadcast, buf, src)
    meta = json.loads(bytes(buf.cpu().numpy()))
    if meta["error"] is not None:
        raise SensiquantError(meta["error"])
    specs = [(k, getattr(torch, d), shape) for k, d, shape in meta["tensors"]]
    nbytes = [torch.Size(shape).numel() * d.itemsize for _, d, shape in specs]
    if rank() == src:
        flat = torch.cat([tensors[k].detach().contiguous().reshape(-1).view(torch.uint8).to(device)
                          for k, _, _ in specs]) if specs else torch.empty(0, dtype=torch.uint8, device=device)
    else:
        flat = torch.empty(sum(nbytes), dtype=torch.uint8, device=device)
    _settled(dist.broadcast, flat, src)
    if rank() == src:
        return tensors
    out, offset = {}, 0
    for (k, d, shape), n in zip(specs, nbytes, strict=True):
        out[k] = flat[offset:offset + n].clone().view(d).reshape(shape)
        offset += n
    return out
