"""Run under torchrun by test_distributed.py: the gradient and input statistics of the tiny model on seeded
windows, each rank on its share, written by rank 0 (``python distributed_stats.py MODEL_DIR OUT``); or GWQ with
float32 gradient sums (``python distributed_stats.py MODEL_DIR OUT_DIR TEXT``); or ``broadcast OUT``: rank 1's
tensors of every stored dtype, and its error, as every rank received them."""

import sys

import torch
from safetensors.torch import save_file

from sensiquant.calib import gradient_statistics, input_statistics
from sensiquant.calib.distributed import init_from_env, is_main, shard
from sensiquant.io import load_model
from sensiquant.runtime.walk import find_linears


def statistics(model_dir: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model, _ = load_model(model_dir)
    windows = torch.randint(0, 200, (6, 48), generator=torch.Generator().manual_seed(1))
    layers = find_linears(model, ("lm_head", "*embed*"))
    grads = gradient_statistics(model, shard(windows), layers, torch.float32, progress=False)
    inputs = input_statistics(model, shard(windows), layers, progress=False)
    out = {"loss": torch.tensor(grads.loss), "tokens": torch.tensor(inputs.n_tokens)}
    for name in layers:
        out |= {f"{name}.abs": grads.abs_sum[name], f"{name}.sq": grads.sq_sum[name],
                f"{name}.h": inputs.hessian[name], f"{name}.norm": inputs.col_norm[name]}
    return out


def gwq_float32(model_dir: str, out_dir: str, text: str) -> None:
    from sensiquant import api
    from sensiquant.pipeline import gwq

    base = gwq()
    config = base.replace(calib=base.calib.replace(source=text, samples=4, seqlen=64, grad_dtype="float32"))
    api.quantize(model_dir, config, out_dir, progress=False, resume=False)


def sample_tensors() -> dict[str, torch.Tensor]:
    """Seeded tensors of every dtype a checkpoint stores, an empty one included."""
    g = torch.Generator().manual_seed(2)
    return {"codes": torch.randint(0, 255, (5, 7), generator=g, dtype=torch.uint8),
            "scale": torch.randn(3, 4, generator=g).to(torch.bfloat16), "half": torch.randn(6, generator=g).half(),
            "index": torch.randint(-9, 9, (2, 3), generator=g, dtype=torch.int32),
            "mask": torch.rand(4, generator=g) > 0.5, "empty": torch.zeros(0, 3)}


def broadcast(out: str) -> None:
    from sensiquant.calib.distributed import broadcast_tensors, rank
    from sensiquant.errors import SensiquantError

    got = broadcast_tensors(sample_tensors() if rank() == 1 else None, 1)
    try:
        broadcast_tensors(None, 1, "layer x: went wrong" if rank() == 1 else None)
        raised = ""
    except SensiquantError as exc:
        raised = str(exc)
    if rank() == 0:
        save_file({**{k: v.contiguous() for k, v in got.items()}, "raised": torch.tensor(list(raised.encode()))}, out)


if __name__ == "__main__":
    init_from_env()
    if sys.argv[1] == "broadcast":
        broadcast(sys.argv[2])
    elif len(sys.argv) > 3:
        gwq_float32(*sys.argv[1:4])
    else:
        stats = statistics(sys.argv[1])
        if is_main():
            save_file({k: v.contiguous() for k, v in stats.items()}, sys.argv[2])
