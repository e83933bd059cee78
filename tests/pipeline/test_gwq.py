"""The pipeline on a tiny random LLaMA: gradient pass, GWQ outliers over every method, checkpoint round trip, CLI."""

import json

import pytest
import torch

from sensiquant import api
from sensiquant.calib import CalibConfig, calibration_windows, gradient_statistics, input_statistics
from sensiquant.cli import main
from sensiquant.errors import SensiquantError
from sensiquant.eval import perplexity
from sensiquant.format import LayerSpec
from sensiquant.io import load_model, load_quantized
from sensiquant.methods import GPTQConfig, OutlierConfig, RoundConfig
from sensiquant.pipeline import GWQ_SPEC, QuantConfig, gwq, recipe
from sensiquant.runtime import QuantLinear
from sensiquant.runtime.walk import find_linears

METHODS = {"rtn": RoundConfig(), "hqq": RoundConfig(), "gptq": GPTQConfig()}


def _calib(text_file):
    return CalibConfig(source=str(text_file), samples=2, seqlen=64)


def _config(text_file, spec, method="rtn", ratio=0.0, saliency="grad", scope="matrix", sequential=True):
    """GWQ outliers (``ratio`` of each matrix by ``saliency``) over ``method``: rtn/hqq round on that grid, gptq on
    the spec's grid."""
    grid = spec.grid if method == "gptq" else method
    return QuantConfig(method=METHODS[method], default=spec.replace(grid=grid, outlier_ratio=ratio),
                       outliers=OutlierConfig(saliency=saliency, scope=scope), calib=_calib(text_file),
                       sequential=sequential)


def test_gradient_statistics_match_plain_backward(tiny_llama, text_file):
    model, tok = load_model(str(tiny_llama))
    windows = calibration_windows(tok, _calib(text_file))
    layers = find_linears(model, ["lm_head"])
    stats = gradient_statistics(model, windows, layers, dtype=torch.float32, checkpointing=True, progress=False)
    # gradients were folded into the scores and freed; requires_grad flags are restored
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    # reference: per-window gradients by plain autograd, no hooks, no checkpointing
    name = "model.layers.1.mlp.down_proj"
    ref_abs = torch.zeros_like(layers[name].weight)
    for window in windows:
        model.zero_grad()
        ids = window.unsqueeze(0)
        model(input_ids=ids, labels=ids).loss.backward()
        ref_abs += layers[name].weight.grad.abs()
    assert torch.allclose(stats.abs_sum[name], ref_abs, rtol=1e-4, atol=1e-7)
    assert all(float(s.sum()) > 0 for s in stats.abs_sum.values())
    # compact storage by default
    compact = gradient_statistics(model, windows, layers, progress=False)
    assert compact.abs_sum[name].dtype == torch.bfloat16


def test_input_statistics_hessian(tiny_llama, text_file):
    model, tok = load_model(str(tiny_llama))
    windows = calibration_windows(tok, _calib(text_file))
    name = "model.layers.0.self_attn.o_proj"
    layers = {name: model.get_submodule(name)}
    seen = []
    handle = layers[name].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, 96)))
    stats = input_statistics(model, windows, layers, progress=False)
    handle.remove()
    x = torch.cat(seen[: len(seen) // 2]) if len(seen) > 2 else torch.cat(seen)
    assert torch.allclose(stats.hessian[name], 2 / x.shape[0] * x.T @ x, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["rtn", "hqq", "gptq"])
@pytest.mark.parametrize("saliency", ["grad", "hessian", "random"])
def test_gwq_quantize_save_load(tiny_llama, text_file, tmp_path, method, saliency):
    config = _config(text_file, LayerSpec(grid="rtn", bits=3, group_size=32), method, 0.01, saliency)
    model, tok, report = api.quantize(str(tiny_llama), config, tmp_path / "ckpt", progress=False)
    for layer in model.modules():
        if isinstance(layer, QuantLinear):
            n = layer.in_features * layer.out_features
            assert layer.n_outliers == round(0.01 * n)
    assert report.n_outliers > 0
    assert all(r.spec.grid == (method if method != "gptq" else "rtn") for r in report.layers.values())
    text = text_file.read_text()
    before = perplexity(model, tok, text, seqlen=128, progress=False)
    loaded, tok2 = load_quantized(tmp_path / "ckpt")
    after = perplexity(loaded, tok2, text, seqlen=128, progress=False)
    assert abs(after.ppl - before.ppl) / before.ppl <= 1e-6
    stored = sum(8 * t.numel() * t.element_size() for m in loaded.modules() if isinstance(m, QuantLinear)
                 for t in m.stored_tensors().values())
    assert stored == report.quantized_bits


def test_global_scope_spreads_unevenly(tiny_llama, text_file):
    config = _config(text_file, LayerSpec(grid="rtn", bits=3, group_size=32), "rtn", 0.02, scope="global")
    _, _, report = api.quantize(str(tiny_llama), config, progress=False)
    counts = [r.n_outliers for r in report.layers.values()]
    assert sum(counts) == pytest.approx(0.02 * report.quantized_params, rel=0.01)
    assert len(set(counts)) > 1


def test_gwq_outliers_lower_output_error(tiny_llama, text_file):
    """Keeping 2% of the weights by gradient lowers the calibration loss compared with none."""
    model, tok = load_model(str(tiny_llama))
    text = text_file.read_text()
    ppl = {}
    for ratio in (0.0, 0.02):
        config = _config(text_file, LayerSpec(grid="rtn", bits=2, group_size=64), "rtn", ratio)
        m, _, _ = api.quantize(str(tiny_llama), config, progress=False)
        ppl[ratio] = perplexity(m, tok, text, seqlen=128, progress=False).ppl
    base = perplexity(model, tok, text, seqlen=128, progress=False).ppl
    assert abs(ppl[0.02] - base) < abs(ppl[0.0] - base)


def test_cli_gwq(tiny_llama, text_file, tmp_path, capsys):
    rc = main(["quantize", str(tiny_llama), "--method", "gwq", "--bits", "3", "--no-quant-meta",
               "--group-size", "32", "--outlier-ratio", "0.01", "--calib", str(text_file), "--calib-samples", "2",
               "--calib-seqlen", "64", "--out", str(tmp_path / "c"), "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_outliers"] > 0 and out["gradient_seconds"] > 0 and out["method"] == "gwq"
    manifest = json.loads((tmp_path / "c" / "sensiquant.json").read_text())
    assert manifest["config"]["method"]["name"] == "gptq" and manifest["config"]["outliers"]["saliency"] == "grad"
    assert out["bits_per_param"] > 3.5  # 3-bit codes + FP16 scales/zeros per 32 + 1% CSR outliers


def test_cli_gwq_defaults_are_the_best_measured_setting(tiny_llama, text_file, tmp_path, capsys):
    rc = main(["quantize", str(tiny_llama), "--method", "gwq", "--calib", str(text_file), "--calib-samples", "2",
               "--calib-seqlen", "64", "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    spec = out["spec"]
    assert (spec["grid"], spec["bits"], spec["group_size"], spec["quant_meta"], spec["outlier_ratio"],
            spec["outlier_format"]) == ("hqq", 3, 64, True, 0.019, "block")
    config = gwq()
    assert isinstance(config.method, GPTQConfig) and config.method.act_order and config.default == GWQ_SPEC
    assert config.outliers.saliency == "grad" and config.outliers.scope == "matrix"
    assert config.calib.samples == 16 and config.calib.source == "wikitext2" and config.calib.seqlen == 2048


@pytest.mark.parametrize("bad", [lambda: recipe("awq"), lambda: OutlierConfig(saliency="x"),
                                 lambda: LayerSpec(outlier_ratio=0.7), lambda: OutlierConfig(scope="row"),
                                 lambda: CalibConfig(samples=0), lambda: GPTQConfig(block_size=0)])
def test_bad_gwq_config(bad):
    with pytest.raises(SensiquantError):
        bad()


def test_config_round_trips_through_json():
    config = gwq(calib=CalibConfig(samples=3))
    again = QuantConfig.from_json(config.to_json())
    assert again == config and again.to_dict()["version"] == 1
    assert QuantConfig.from_dict({"default": {"method": "rtn", "bits": 3}, "skip": ["lm_head"], "overrides": {}}) \
        == QuantConfig(default=LayerSpec(grid="rtn", bits=3), skip=("lm_head",))  # a manifest before versions


@pytest.mark.parametrize("argv, flag", [(["--method", "hqq", "--act-order"], "--act-order"),
                                        (["--method", "rtn", "--saliency", "fisher"], "--saliency"),
                                        (["--method", "hqq", "--calib-samples", "4"], "--calib-samples")])
def test_cli_rejects_flags_that_do_not_apply(tiny_llama, tmp_path, capsys, argv, flag):
    assert main(["quantize", str(tiny_llama), *argv, "--out", str(tmp_path / "c"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sensiquant: error: ") and flag in err and not (tmp_path / "c").exists()


def test_sequential_blocks_reproduce_the_forward(tiny_llama, text_file):
    """Running the captured block inputs through the blocks one by one gives the model's own layer inputs."""
    from sensiquant.calib import calibrate_sequentially, capture_block_inputs, find_block_list

    model, tok = load_model(str(tiny_llama))
    windows = calibration_windows(tok, _calib(text_file))
    layers = find_linears(model, ["lm_head"])
    prefix, blocks = find_block_list(model, list(layers))
    assert prefix == "model.layers" and len(blocks) == 2
    captured = capture_block_inputs(model, blocks[0], windows)
    assert len(captured) == 2
    seen = {}
    calibrate_sequentially(model, prefix, blocks, windows, list(layers), lambda h: seen.update(h), progress=False)
    assert set(seen) == set(layers)  # every layer got a Hessian
    # with nothing quantized, the second block's Hessians equal those of one plain forward pass
    ref = input_statistics(model, windows, {"model.layers.1.mlp.down_proj": layers["model.layers.1.mlp.down_proj"]},
                           progress=False).hessian["model.layers.1.mlp.down_proj"]
    assert torch.allclose(seen["model.layers.1.mlp.down_proj"]["hessian"], ref, rtol=1e-4, atol=1e-6)


def test_asymmetric_statistics_on_one_stream_are_the_hessians(tiny_llama, text_file):
    """Before anything is quantized both streams are one: no cross term, the same Hessians, the block's outputs."""
    from sensiquant.calib.sequential import (
        block_asymmetric_statistics,
        block_hessians,
        capture_block_inputs,
        find_block_list,
        hidden_of,
    )

    model, tok = load_model(str(tiny_llama))
    windows = calibration_windows(tok, _calib(text_file))
    layers = find_linears(model, ["lm_head"])
    prefix, blocks = find_block_list(model, list(layers))
    inputs = capture_block_inputs(model, blocks[0], windows)
    names = [n for n in layers if n.startswith(prefix + ".0.")]
    stats, fp_out = block_asymmetric_statistics(model, blocks[0], inputs, [hidden_of(a, k) for a, k in inputs],
                                                names)
    ref = block_hessians(model, blocks[0], inputs, names)
    for n in names:
        assert torch.allclose(stats[n]["hessian"], ref[n], rtol=1e-5, atol=1e-7)
        assert float(stats[n]["asym_cross"].abs().max()) == 0.0
    out = blocks[0](*inputs[0][0], **inputs[0][1])
    assert torch.equal(fp_out[0], out[0] if isinstance(out, tuple) else out)


def test_gptaq_recipe_runs_block_by_block_and_differs_from_gptq(tiny_llama, text_file):
    out = {}
    for name in ("gptq", "gptaq"):
        config = recipe(name, spec=LayerSpec(grid="rtn", bits=2, group_size=32), calib=_calib(text_file))
        model, _, report = api.quantize(str(tiny_llama), config, progress=False)
        assert set(report.layers) == set(find_linears(load_model(str(tiny_llama))[0], ["lm_head", "*embed*"]))
        out[name] = (model.model.layers[0].self_attn.q_proj.dequantize(),
                     model.model.layers[1].mlp.down_proj.dequantize())
    assert torch.equal(out["gptq"][0], out["gptaq"][0])  # the first block's inputs are the same on both streams
    assert not torch.equal(out["gptq"][1], out["gptaq"][1])  # later blocks see the quantized stream drift


def test_sequential_gptq_differs_from_one_pass(tiny_llama, text_file):
    out = {}
    for sequential in (True, False):
        config = _config(text_file, LayerSpec(grid="rtn", bits=2, group_size=32), "gptq", sequential=sequential)
        model, _, _ = api.quantize(str(tiny_llama), config, progress=False)
        out[sequential] = model.model.layers[1].mlp.down_proj.dequantize()
    assert not torch.equal(out[True], out[False])


def test_a_config_names_the_statistics_it_calibrates():
    assert recipe("hqq").needs == frozenset() and recipe("rtn").needs == frozenset()
    assert recipe("gptq").needs == {"hessian"}
    assert recipe("gptaq").needs == {"hessian", "asym_cross"}
    assert gwq().needs == {"hessian", "grad_abs_sum"}
    one_layer = QuantConfig(overrides={"x": LayerSpec(outlier_ratio=0.01)}, outliers=OutlierConfig("fisher"))
    assert one_layer.needs == {"grad_sq_sum"}  # an override with outliers is enough
