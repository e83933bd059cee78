"""`sensiquant export gguf`: the tensors of the file are the checkpoint's (block bytes copied, q/k rows in
llama.cpp's order, names from the gguf package's map), metadata from the base GGUF, one error line otherwise."""

import gguf
import numpy as np
import pytest
import torch

from bench.tiny_model import save_tiny_llama
from sensiquant import LayerSpec, QuantConfig, RoundConfig, quantize_model
from sensiquant.cli import main
from sensiquant.errors import SensiquantError
from sensiquant.io import load_model, load_quantized, save_quantized
from sensiquant.io.gguf_export import export_gguf


def _source_gguf(model, path):
    """A base GGUF of the tiny LLaMA as llama.cpp's converter lays it out (only names, shapes and a few keys
    matter to the export; the values are the model's)."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_string("tokenizer.ggml.model", "gpt2")
    for name, p in model.state_dict().items():
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is not None and name != "lm_head.weight":
            w.add_tensor(target, p.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaMA whose 256-wide rows take K-types and whose 544-wide down projections fall back."""
    root = tmp_path_factory.mktemp("gguf-export")
    model_dir = save_tiny_llama(root / "model", hidden_size=256, intermediate_size=544)
    model, _ = load_model(str(model_dir))
    return model_dir, _source_gguf(model, root / "base.gguf")


def _quantized(tiny, tmp_path, spec):
    model_dir, base = tiny
    model, tokenizer = load_model(str(model_dir))
    config = QuantConfig(method=RoundConfig(), default=spec)
    report = quantize_model(model, config, progress=False)
    return save_quantized(model, tokenizer, tmp_path / "ckpt", config, report, card={"base_model": str(base)})


def _reverse_permute(w, n_head):  # what transformers does to q/k rows when it loads a llama GGUF
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


@pytest.mark.parametrize("kind", ["Q4_K", "Q3_K", "Q4_0"])
def test_exported_tensors_are_the_checkpoints(tiny, tmp_path, kind):
    ckpt = _quantized(tiny, tmp_path, LayerSpec(grid="hqq", gguf=kind))
    result = export_gguf(ckpt, tmp_path / "out.gguf", progress=False)  # base: the checkpoint's base_model
    model, _ = load_quantized(ckpt)
    cfg = model.config
    reader = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    assert str(reader.fields["general.architecture"].contents()) == "llama"
    assert reader.fields["llama.embedding_length"].contents() == cfg.hidden_size
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {t.name for t in gguf.GGUFReader(str(tiny[1])).tensors}
    state = model.state_dict()
    for i in range(cfg.num_hidden_layers):
        for hf, g, heads in (("self_attn.q_proj", "attn_q", cfg.num_attention_heads),
                             ("self_attn.k_proj", "attn_k", cfg.num_key_value_heads),
                             ("self_attn.v_proj", "attn_v", None), ("mlp.down_proj", "ffn_down", None)):
            layer = model.get_submodule(f"model.layers.{i}.{hf}")
            t = tensors[f"blk.{i}.{g}.weight"]
            assert t.tensor_type.name == layer.spec.gguf
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(layer.out_features, layer.in_features)
            if heads:
                got = _reverse_permute(got, heads)
            # the same codes and scales; llama.cpp's d*sc*q - dmin*m against our (q - zero)*scale: float32 ulps
            np.testing.assert_allclose(got, layer.dequantize().numpy(), rtol=0, atol=1e-7)
        norm = tensors[f"blk.{i}.attn_norm.weight"]
        assert norm.tensor_type.name == "F32"
        np.testing.assert_array_equal(norm.data, state[f"model.layers.{i}.input_layernorm.weight"].numpy())
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type.name == "F16"
    np.testing.assert_array_equal(emb.data, state["model.embed_tokens.weight"].half().numpy())
    down = model.get_submodule("model.layers.0.mlp.down_proj").spec.gguf
    assert down == {"Q4_K": "Q5_0", "Q3_K": "Q4_0", "Q4_0": "Q4_0"}[kind]  # 544 columns: no super-blocks
    assert result["requantized_layers"] == 0
    assert result["linear_bits_per_param"] == pytest.approx(model.sensiquant_report.bits_per_param)


def test_other_layers_need_a_fallback_type(tiny, tmp_path):
    ckpt = _quantized(tiny, tmp_path, LayerSpec(grid="hqq", bits=3, group_size=64))
    with pytest.raises(SensiquantError, match="not on a GGUF grid.*--fallback"):
        export_gguf(ckpt, tmp_path / "out.gguf", progress=False)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".out.gguf*"))
    result = export_gguf(ckpt, tmp_path / "out.gguf", fallback="Q4_K", embed_type="Q8_0", progress=False)
    assert result["requantized_layers"] == 14
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "out.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q5_0"
    assert types["token_embd.weight"] == "Q8_0"


def test_cli_export_and_its_errors(tiny, tmp_path, capsys):
    ckpt = _quantized(tiny, tmp_path, LayerSpec(grid="rtn", gguf="Q8_0"))
    assert main(["export", "gguf", str(ckpt), str(tmp_path / "m.gguf"), "--quiet"]) == 0
    assert "GGUF written to" in capsys.readouterr().out
    assert main(["export", "gguf", str(ckpt), str(tmp_path / "n.gguf"), "--base", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a .gguf file" in err
    assert not (tmp_path / "n.gguf").exists()


def test_quantize_cli_gguf_flag_checks(tiny, tmp_path, capsys):
    model_dir, _ = tiny
    assert main(["quantize", str(model_dir), "--method", "gwq", "--gguf", "Q4_0", "--quiet"]) == 2
    assert "keeps no outliers" in capsys.readouterr().err
    assert main(["quantize", str(model_dir), "--method", "hqq", "--gguf", "Q4_0", "--bits", "3", "--quiet"]) == 2
    assert "sets bits" in capsys.readouterr().err
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), "--method", "rtn", "--gguf", "Q5_K", "--out", str(out), "--quiet",
                 "--json"]) == 0
    model, _ = load_quantized(out)
    specs = {n: m.spec.gguf for n, m in model.named_modules() if hasattr(m, "spec")}
    assert specs["model.layers.0.self_attn.q_proj"] == "Q5_K" and specs["model.layers.0.mlp.down_proj"] == "Q5_1"
    with torch.inference_mode():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_gguf_rows_must_tile_blocks(tiny, tmp_path, tiny_llama):
    model, _ = load_model(str(tiny_llama))  # intermediate 200: no GGUF block tiles a row of 200
    with pytest.raises(SensiquantError, match="down_proj: rows of 200 columns fit no GGUF block"):
        quantize_model(model, QuantConfig(method=RoundConfig(), default=LayerSpec(gguf="Q4_0")), progress=False)


def test_a_gguf_ladder_plan_meets_its_budget_and_exports_as_it_is(tiny, tmp_path, text_file):
    from sensiquant import PlanConfig, apply_plan, make_plan
    from sensiquant.calib import CalibConfig
    from sensiquant.planning.ladder import GGUF_LADDER, LadderConfig

    assert LadderConfig.from_name("q4_k") == LadderConfig.of_gguf("Q4_K")
    assert LadderConfig.of_gguf("Q3_K").nominal_bits_per_param == 3.4375
    assert PlanConfig(ladder=("gguf", "Q4_0")).ladder == tuple(c.name for c in GGUF_LADDER)
    model_dir, base = tiny
    model, tokenizer = load_model(str(model_dir))
    calib = CalibConfig(source=str(text_file), samples=2, seqlen=32)
    config = PlanConfig(method="mxq", budget=4.0, exact=True, ladder=("gguf",), outlier_ratios=(0.0, 0.01),
                        gradient_calib=calib, sensitivity_calib=calib)
    plan = make_plan(model, tokenizer, config, progress=False)
    assert plan.bits_per_param <= 4.0
    assert len({layer.config for layer in plan.layers}) > 1 and all(layer.outlier_ratio == 0 for layer in plan.layers)
    report, qconfig = apply_plan(model, tokenizer, plan, RoundConfig(), progress=False)
    assert report.bits_per_param == pytest.approx(plan.bits_per_param)
    ckpt = save_quantized(model, tokenizer, tmp_path / "ckpt", qconfig, report, card={"base_model": str(base)})
    result = export_gguf(ckpt, tmp_path / "plan.gguf", progress=False)
    assert result["requantized_layers"] == 0
    assert result["linear_bits_per_param"] == pytest.approx(plan.bits_per_param)
