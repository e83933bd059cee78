"""--device: the model and every statistic on the device asked for; the same tests run on a GPU where there is one."""

import pytest
import torch

from sensiquant import api
from sensiquant.cli import main
from sensiquant.errors import SensiquantError
from sensiquant.pipeline import gwq
from sensiquant.runtime import QuantLinear
from sensiquant.runtime.device import resolve_device

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_auto_is_a_gpu_where_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "cuda:99", "gpu0"])
def test_unavailable_or_unknown_device_is_one_clear_error(name):
    if name == "cuda:99" or not torch.cuda.is_available():
        with pytest.raises(SensiquantError, match="device"):
            resolve_device(name)


def test_cli_refuses_a_device_it_does_not_have(tiny_llama, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["quantize", str(tiny_llama), "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().startswith("sensiquant: error: device cuda is not available")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tune", [False, True])
def test_gwq_quantizes_on_the_device(tiny_llama, text_file, device, tune):
    base = gwq()
    config = base.replace(calib=base.calib.replace(source=str(text_file), samples=2, seqlen=64))
    if tune:
        config = config.replace(tuning=api.SignRoundConfig(iters=2))
    model, _, report = api.quantize(str(tiny_llama), config, progress=False, device=device)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == len(report.layers) == 14
    assert all(t.device.type == device for m in layers for t in m.stored_tensors().values())
    assert report.n_outliers > 0
    if device != "cpu":  # the same job on the CPU: the same bits, close outputs
        cpu_model, _, cpu_report = api.quantize(str(tiny_llama), config, progress=False, device="cpu")
        assert cpu_report.quantized_bits == report.quantized_bits
        ids = torch.arange(32)[None]
        out = model(ids.to(device)).logits.cpu()
        assert torch.allclose(out, cpu_model(ids).logits, atol=1e-2, rtol=1e-2)


def test_a_dtype_cast_keeps_the_stored_format_exact(tiny_llama, text_file):
    """``model.to(torch.bfloat16)`` (what ``eval --dtype bfloat16`` does) once rounded the fp16 scales and outliers
    to bfloat16, a different model: the stored tensors keep their dtypes and the weights stay bit-equal."""
    base = gwq()
    config = base.replace(calib=base.calib.replace(source=str(text_file), samples=2, seqlen=64))
    model, _, _ = api.quantize(str(tiny_llama), config, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    before = [(m.stored_tensors(), m.dequantize()) for m in layers]
    assert any(t.dtype == torch.float16 for stored, _ in before for t in stored.values())
    model.to(torch.bfloat16)
    for m, (stored, weight) in zip(layers, before, strict=True):
        assert {k: t.dtype for k, t in m.stored_tensors().items()} == {k: t.dtype for k, t in stored.items()}
        assert torch.equal(m.dequantize(), weight)
        assert m.bias is None or m.bias.dtype == torch.bfloat16
    ids = torch.arange(32)[None]
    out = model(ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
