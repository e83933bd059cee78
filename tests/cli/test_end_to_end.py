"""quantize -> save -> load -> eval on a tiny random LLaMA, through the API and the CLI."""

import json

import pytest
import torch

from sensiquant import api
from sensiquant.cli import main
from sensiquant.eval import perplexity
from sensiquant.format import LayerSpec
from sensiquant.io import load_model, load_quantized, read_manifest
from sensiquant.pipeline import QuantConfig
from sensiquant.runtime import QuantLinear


@pytest.mark.parametrize("spec", [LayerSpec(grid="rtn", bits=4, group_size=64),
                                  LayerSpec(grid="hqq", bits=3, group_size=32, quant_meta=True),
                                  LayerSpec(grid="hqq", bits=2, group_size=None)])
def test_quantize_save_load_eval(tiny_llama, text_file, tmp_path, spec):
    model, tok, report = api.quantize(str(tiny_llama), QuantConfig(default=spec), tmp_path / "ckpt", progress=False)
    qlayers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(qlayers) == 2 * 7 == len(report.layers)
    assert not any(type(m) is torch.nn.Linear and "layers" in n for n, m in model.named_modules())
    text = text_file.read_text()
    before = perplexity(model, tok, text, seqlen=128, progress=False)

    loaded, tok2 = load_quantized(tmp_path / "ckpt")
    after = perplexity(loaded, tok2, text, seqlen=128, progress=False)
    assert after.n_tokens == before.n_tokens
    assert abs(after.ppl - before.ppl) / before.ppl <= 1e-6
    # every QuantLinear forward equals the dequantized reference
    x = torch.randn(3, 96)
    for layer in loaded.modules():
        if isinstance(layer, QuantLinear) and layer.in_features == 96:
            ref = torch.nn.functional.linear(x, layer.dequantize())
            assert torch.equal(layer(x), ref)
    # tied embeddings survive the round trip
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # stored bytes of the quantized tensors equal the accounting
    manifest = read_manifest(tmp_path / "ckpt")
    stored = sum(8 * t.numel() * t.element_size()
                 for layer in loaded.modules() if isinstance(layer, QuantLinear)
                 for t in layer.stored_tensors().values())
    assert stored == manifest["summary"]["quantized_bytes"] * 8 == report.quantized_bits


def test_quantized_model_close_to_original_at_8_bits(tiny_llama, text_file):
    model, tok = load_model(str(tiny_llama))
    base = perplexity(model, tok, text_file.read_text(), seqlen=128, progress=False)
    qmodel, _, _ = api.quantize(str(tiny_llama), LayerSpec(grid="rtn", bits=8, group_size=32), progress=False)
    q8 = perplexity(qmodel, tok, text_file.read_text(), seqlen=128, progress=False)
    assert abs(q8.ppl - base.ppl) / base.ppl < 0.01


def test_skip_patterns(tiny_llama):
    config = QuantConfig(default=LayerSpec(bits=4), skip=["lm_head", "*embed*", "*.mlp.*"])
    model, _, report = api.quantize(str(tiny_llama), config, progress=False)
    assert all(".self_attn." in name for name in report.layers)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)


def test_config_json_round_trip():
    config = QuantConfig(default=LayerSpec(grid="rtn", bits=3, group_size=None, quant_meta=True),
                         overrides={"model.layers.0.mlp.down_proj": LayerSpec(bits=8)})
    assert QuantConfig.from_json(config.to_json()) == config


def test_cli_quantize_and_eval(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "cli-ckpt"
    rc = main(["quantize", str(tiny_llama), "--method", "rtn", "--bits", "4", "--group-size", "64",
               "--out", str(out), "--ppl", str(text_file), "--seqlen", "128", "--json", "--quiet"])
    assert rc == 0
    q = json.loads(capsys.readouterr().out)
    assert q["bits_per_param"] == pytest.approx(read_manifest(out)["summary"]["bits_per_param"])
    rc = main(["eval", str(out), "--ppl", str(text_file), "--seqlen", "128", "--json", "--quiet"])
    assert rc == 0
    e = json.loads(capsys.readouterr().out)
    name = str(text_file)
    assert e["ppl"][name]["ppl"] == pytest.approx(q["ppl"][name]["ppl"], rel=1e-6)


@pytest.mark.parametrize("argv,message", [
    (["quantize", "TINY", "--bits", "5"], "unsupported bit width 5"),
    (["quantize", "TINY", "--group-size", "0"], "group size must be a positive integer"),
    (["eval", "/no/such/model"], "model not found"),
    (["eval", "TINY", "--ppl", "/no/such/file.txt"], "text file not found"),
    (["eval", "TINY", "--ppl", "TEXT", "--seqlen", "100000"], "shorter than one window"),
    (["eval", "TINY", "--ppl", "wikitext2", "--data-dir", "/no/such/dir"], "data directory not found"),
    (["eval", "TINY", "--ppl", "nosuchset"], "unknown dataset"),
    (["quantize", "TINY", "--preset", "best", "--method", "gwq"], "either --preset or --method"),
    (["quantize", "TINY", "--method", "gptq", "--tune-iters", "3"], "--tune-iters applies only with block tuning"),
    (["quantize", "TINY", "--method", "hqq", "--tune-lr", "0.02"], "--tune-lr applies only with block tuning"),
    (["quantize", "TINY", "--preset", "best", "--tune-lr", "-1"], "learning rate must be positive"),
    (["quantize", "TINY", "--preset", "best", "--no-tune", "--tune-dtype", "bfloat16"], "applies only with block"),
    (["quantize", "TINY", "--outlier-format", "dense"], "invalid choice"),
])
def test_cli_errors_are_one_line(tiny_llama, text_file, capsys, argv, message):
    argv = [str(tiny_llama) if a == "TINY" else str(text_file) if a == "TEXT" else a for a in argv]
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_preset_best_tunes_and_stores_block_outliers(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "best"
    rc = main(["quantize", str(tiny_llama), "--preset", "best", "--tune-iters", "2", "--tune-lr", "0.02", "--calib",
               str(text_file), "--calib-samples", "2", "--calib-seqlen", "256", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    q = json.loads(capsys.readouterr().out)
    assert q["preset"] == "best" and q["tuned"] and q["n_outliers"] > 0
    assert q["spec"]["outlier_format"] == "block"
    manifest = read_manifest(out)
    config = QuantConfig.from_dict(manifest["config"])
    assert config.tuning is not None and config.tuning.iters == 2 and config.tuning.lr == 0.02
    assert config.calib.samples == 2 and config.default.outlier_format == "block"
    loaded, _ = load_quantized(out, verify=True)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14


def test_cli_gptaq_writes_a_checkpoint_of_its_method(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "gptaq"
    rc = main(["quantize", str(tiny_llama), "--method", "gptaq", "--bits", "2", "--group-size", "32", "--calib",
               str(text_file), "--calib-samples", "2", "--calib-seqlen", "64", "--out", str(out), "--json", "--quiet"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["method"] == "gptaq"
    config = QuantConfig.from_dict(read_manifest(out)["config"])
    assert type(config.method).__name__ == "GPTAQConfig" and config.method.alpha == 0.25
    loaded, _ = load_quantized(out, verify=True)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 14
