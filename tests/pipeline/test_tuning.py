"""Block tuning through the one driver on the tiny LLaMA: both starts, outliers, the kept-start guarantee per block,
the stored model equal to the tuned one, and the errors."""

import pytest
import torch

from sensiquant.calib import CalibConfig, calibration_windows
from sensiquant.errors import SensiquantError
from sensiquant.format import LayerSpec
from sensiquant.io import load_model
from sensiquant.methods import GPTAQConfig, GPTQConfig, RoundConfig, SignRoundConfig
from sensiquant.pipeline import QuantConfig, quantize_model
from sensiquant.pipeline.blockwise import tuning_batches
from sensiquant.runtime import QuantLinear


def _config(text_file, method, tuning, spec=None):
    spec = spec or LayerSpec(grid="hqq", bits=3, group_size=32, quant_meta=True)
    return QuantConfig(method=method, default=spec, calib=CalibConfig(source=str(text_file), samples=2, seqlen=256),
                       tuning=tuning)


def _hidden(model, ids):
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("method", [RoundConfig(), GPTQConfig(), GPTAQConfig()])
def test_tuned_blocks_never_end_above_their_start(tiny_llama, text_file, method):
    model, tok = load_model(str(tiny_llama))
    tuning = SignRoundConfig(iters=8, lr=0.02, seqlen=64, batch_size=2)
    report = quantize_model(model, _config(text_file, method, tuning), tok, progress=False)
    losses = report.extra["tuning_loss"]
    assert sorted(losses) == ["0", "1"]
    assert all(end <= start for start, end in losses.values())
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in report.layers)


def test_zero_steps_is_the_start_method(tiny_llama, text_file):
    """With 0 steps the tuned pipeline stores exactly what plain rounding stores."""
    spec = LayerSpec(grid="rtn", bits=3, group_size=32)
    tuned, tok = load_model(str(tiny_llama))
    quantize_model(tuned, _config(text_file, RoundConfig(), SignRoundConfig(iters=0, seqlen=64), spec), tok,
                   progress=False)
    plain, _ = load_model(str(tiny_llama))
    quantize_model(plain, _config(text_file, RoundConfig(), None, spec), tok, progress=False)
    for name, module in plain.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(module.dequantize(), tuned.get_submodule(name).dequantize())


def test_tuning_lowers_the_output_error_of_round_to_nearest(tiny_llama, text_file):
    ids = calibration_windows(load_model(str(tiny_llama))[1], CalibConfig(source=str(text_file), samples=1,
                                                                          seqlen=256, seed=5))
    spec = LayerSpec(grid="rtn", bits=2, group_size=32)
    plain, tok = load_model(str(tiny_llama))
    reference = _hidden(plain, ids)
    quantize_model(plain, _config(text_file, RoundConfig(), None, spec), tok, progress=False)
    tuned, _ = load_model(str(tiny_llama))
    report = quantize_model(tuned, _config(text_file, RoundConfig(), SignRoundConfig(iters=30, lr=0.02, seqlen=64,
                                                                                     batch_size=2), spec),
                            tok, progress=False)
    assert sum(e for _, e in report.extra["tuning_loss"].values()) < sum(
        s for s, _ in report.extra["tuning_loss"].values())
    # the whole quantized model's output moves closer to the full-precision one
    error = {name: float((_hidden(m, ids) - reference).pow(2).mean()) for name, m in (("tuned", tuned),
                                                                                      ("plain", plain))}
    assert error["tuned"] < error["plain"]


def test_block_outliers_survive_tuning(tiny_llama, text_file):
    model, tok = load_model(str(tiny_llama))
    spec = LayerSpec(grid="hqq", bits=3, group_size=32, quant_meta=True, outlier_ratio=0.02, outlier_format="block")
    report = quantize_model(model, _config(text_file, GPTQConfig(), SignRoundConfig(iters=3, seqlen=64), spec), tok,
                            progress=False)
    assert report.n_outliers == sum(round(0.02 * r.shape[0] * r.shape[1]) for r in report.layers.values())
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert "outlier_offsets" in layer.tensor_names


def test_tuning_batches_cut_windows_into_samples():
    windows = torch.arange(3 * 100).reshape(3, 100)
    batches = tuning_batches(windows, SignRoundConfig(seqlen=30, batch_size=4))
    samples = torch.cat([b["input_ids"] for b in batches])
    assert samples.shape == (9, 30) and [b["input_ids"].shape[0] for b in batches] == [4, 4, 1]
    assert torch.equal(samples[3], windows[1, :30])


def test_prepared_batches_are_one_clear_error(tiny_llama, text_file):
    model, tok = load_model(str(tiny_llama))
    with pytest.raises(SensiquantError, match="token windows"):
        quantize_model(model, _config(text_file, RoundConfig(), SignRoundConfig(iters=1)), tok, progress=False,
                       calib_batches=[{"input_ids": torch.zeros(1, 16, dtype=torch.long)}])
