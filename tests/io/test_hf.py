"""sensiquant checkpoints through plain transformers: after ``import sensiquant``, ``from_pretrained`` builds the
same QuantLinear model as ``load_quantized`` (same checks, same logits), ``save_pretrained`` writes a sensiquant
checkpoint again, and without the import transformers stops with an error naming sensiquant. Plus the model card."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from checkpoint_tools import PROMPT_IDS, edit_manifest, logits, read_raw_safetensors, resign, write_raw_safetensors
from transformers import AutoModelForCausalLM

import sensiquant as sq
from sensiquant import SensiquantError
from sensiquant.cli import main
from sensiquant.io import load_quantized, read_manifest, save_quantized, verify_checkpoint
from sensiquant.io.checkpoint import CONFIG, MANIFEST, QUANTIZATION_MARKER, WEIGHTS, WEIGHTS_GUARD
from sensiquant.io.safetensors import read_safetensors_header
from sensiquant.methods.outliers import OutlierConfig
from sensiquant.runtime import QuantLinear

REPO = Path(__file__).resolve().parents[2]
DOWN = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
SPECS = {
    "4bit-g64-fp16": sq.QuantConfig(default=sq.LayerSpec(grid="hqq", bits=4, group_size=64)),
    "3bit-g64-meta8": sq.QuantConfig(default=sq.LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True)),
    "csr-outliers": sq.QuantConfig(default=sq.LayerSpec(grid="rtn", bits=4, group_size=32, outlier_ratio=0.01),
                                   outliers=OutlierConfig("magnitude")),
    "block-outliers": sq.QuantConfig(default=sq.LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True,
                                                          outlier_ratio=0.02, outlier_format="block"),
                                     outliers=OutlierConfig("magnitude")),
    "mixed": sq.QuantConfig(default=sq.LayerSpec(grid="rtn", bits=4, group_size=32),
                            overrides={DOWN[0]: sq.LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True),
                                       DOWN[1]: sq.LayerSpec(grid="rtn", bits=8, group_size=None),
                                       "model.layers.0.self_attn.q_proj": sq.LayerSpec(bits=2, group_size=32,
                                                                                       outlier_ratio=0.01)},
                            outliers=OutlierConfig("magnitude")),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    work = tmp_path_factory.mktemp("hf")
    out = {}
    for name, config in SPECS.items():
        extra = {"plan.json": json.dumps({"note": name})} if name == "mixed" else None
        model, tok, report = sq.api.quantize(str(tiny_llama), config, progress=False)
        out[name] = save_quantized(model, tok, work / name, config, report, extra_files=extra,
                                   card={"base_model": "tiny/llama"})
    return out


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    """A fresh copy of the mixed checkpoint (every kind of tensor, a plan.json) to change."""
    return shutil.copytree(checkpoints["mixed"], tmp_path / "ckpt")


def _stored_dtypes(model, path):
    header = read_safetensors_header(path / WEIGHTS)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            for leaf, value in module.stored_tensors().items():
                info = header.tensors[f"{name}.{leaf}"]
                assert (sq.io.safetensors.dtype_name(value.dtype), tuple(value.shape)) == (info.dtype, info.shape)


@pytest.mark.parametrize("name", list(SPECS))
def test_from_pretrained_equals_load_quantized(checkpoints, name):
    path = checkpoints[name]
    reference, _ = load_quantized(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    layers = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert layers == set(read_manifest(path)["layers"]) and len(layers) == 14
    assert torch.equal(logits(model), logits(reference))
    _stored_dtypes(model, path)
    assert model.sensiquant_report.quantized_bits == reference.sensiquant_report.quantized_bits
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert model.config.quantization_config.quant_method == "sensiquant" and not model.training


def test_mixed_checkpoint_holds_every_kind_of_layer(checkpoints):
    layers = read_manifest(checkpoints["mixed"])["layers"]
    assert {entry["spec"]["bits"] for entry in layers.values()} == {2, 3, 4, 8}
    header = read_safetensors_header(checkpoints["mixed"] / WEIGHTS).tensors
    assert any(n.endswith(".scale_qscale") for n in header) and any(n.endswith(".outlier_row_ptr") for n in header)
    assert any(n.endswith(".outlier_counts") for n in read_safetensors_header(
        checkpoints["block-outliers"] / WEIGHTS).tensors)


def test_config_json_names_the_quantizer_and_guards_the_weights(checkpoints):
    config = json.loads((checkpoints["mixed"] / CONFIG).read_text())
    assert config["quantization_config"] == QUANTIZATION_MARKER
    assert config["quantization_config"]["quant_method"] == "sensiquant"
    assert config["transformers_weights"] == WEIGHTS_GUARD and not WEIGHTS_GUARD.endswith(".safetensors")


def test_save_pretrained_round_trip(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    summary = verify_checkpoint(out)
    assert summary["sha256_ok"] and summary["unlisted_files"] == []
    before, after = read_manifest(ckpt), read_manifest(out)
    for key in ("config", "layers", "card", "summary", "tensors"):
        assert after[key] == before[key], key
    assert (out / "plan.json").read_text() == (ckpt / "plan.json").read_text()
    assert (out / "README.md").read_text() == (ckpt / "README.md").read_text()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(after["files"])
    reference = logits(model)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out)), reference)
    assert torch.equal(logits(load_quantized(out)[0]), reference)


def test_save_pretrained_over_its_own_checkpoint(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    reference = logits(model)
    model.save_pretrained(ckpt)  # replaced whole, the tokenizer and plan.json read before
    assert verify_checkpoint(ckpt)["sha256_ok"]
    loaded, tok = load_quantized(ckpt)
    assert tok is not None and (ckpt / "plan.json").is_file()
    assert torch.equal(logits(loaded), reference)


def test_save_pretrained_of_load_quantized_is_a_checkpoint_too(ckpt, tmp_path):
    model, _ = load_quantized(ckpt)
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), logits(model))


def test_save_pretrained_refuses_what_it_cannot_write(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with pytest.raises(SensiquantError, match="state_dict, push_to_hub and variant"):
        model.save_pretrained(tmp_path / "a", push_to_hub=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(SensiquantError, match="not a sensiquant checkpoint"):
        model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def test_save_pretrained_without_its_source_still_writes_the_model(ckpt, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    reference = logits(model)
    shutil.rmtree(ckpt)
    with pytest.warns(UserWarning, match="without the tokenizer"):
        model.save_pretrained(tmp_path / "saved")
    assert verify_checkpoint(tmp_path / "saved")["sha256_ok"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), reference)


# ---------------------------------------------------------------------------------------- in a fresh interpreter


def _python(code: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_without_import_sensiquant_transformers_fails_clearly(checkpoints):
    run = _python("""
        import sys
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print("LOADED")
    """, checkpoints["mixed"])
    assert run.returncode != 0 and "LOADED" not in run.stdout
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "sensiquant checkpoint: run `import sensiquant`" in last, run.stderr
    assert "Unknown quantization type, got sensiquant" in run.stderr


def test_import_sensiquant_registers_lazily_and_loads(checkpoints, tmp_path):
    path = checkpoints["block-outliers"]
    run = _python(f"""
        import sys
        import torch
        from safetensors.torch import save_file
        import sensiquant
        assert "transformers" not in sys.modules, "import sensiquant imported transformers"
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
        with torch.inference_mode():
            save_file({{"logits": model(torch.tensor([{PROMPT_IDS}])).logits.contiguous()}}, sys.argv[2])
    """, path, tmp_path / "logits.safetensors")
    assert run.returncode == 0, run.stderr
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], logits(load_quantized(path)[0]))


# ------------------------------------------------------------------------------------- checked like load_quantized


def _refused(path, *needles):
    with pytest.raises(SensiquantError) as info:
        AutoModelForCausalLM.from_pretrained(path)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_edited_manifest_is_refused(ckpt):
    edit_manifest(ckpt, lambda m: m["layers"][DOWN[0]]["spec"].update(bits=2))
    _refused(ckpt, "stored bits")


def test_resigned_wrong_structure_is_refused(ckpt):
    def to_2_bits(manifest):
        manifest["layers"][DOWN[0]]["spec"]["bits"] = 2
        manifest["layers"][DOWN[0]]["bits"] = sq.format.storage_bits(
            tuple(manifest["layers"][DOWN[0]]["shape"]), sq.LayerSpec.from_dict(manifest["layers"][DOWN[0]]["spec"]),
            0)
    edit_manifest(ckpt, to_2_bits)
    resign(ckpt)  # every checksum consistent again: only the structure check can tell
    _refused(ckpt, DOWN[0], "qweight")


def test_changed_config_is_refused(ckpt):
    config = json.loads((ckpt / CONFIG).read_text())
    config["rms_norm_eps"] = 1e-3
    (ckpt / CONFIG).write_text(json.dumps(config, indent=2))
    _refused(ckpt, "config.json is not the file this checkpoint was saved with")


def test_weights_of_another_checkpoint_are_refused(ckpt, checkpoints):
    shutil.copy(checkpoints["4bit-g64-fp16"] / WEIGHTS, ckpt / WEIGHTS)
    _refused(ckpt)


def test_missing_manifest_is_refused(ckpt):
    (ckpt / MANIFEST).unlink()
    _refused(ckpt, "no sensiquant.json beside", "download a hub repository first")


def test_bad_outlier_indices_are_refused(ckpt):
    header, body = read_raw_safetensors(ckpt / WEIGHTS)
    entry = header["model.layers.0.self_attn.q_proj.outlier_col_idx"]
    start, end = entry["data_offsets"]
    width = (end - start) // entry["shape"][0]
    body = bytearray(body)
    body[start:start + width] = (97).to_bytes(width, "little")  # a column outside the 96 of the matrix
    write_raw_safetensors(ckpt / WEIGHTS, header, bytes(body))
    resign(ckpt)
    _refused(ckpt, "outlier column indices outside")


def test_a_tensor_missing_from_file_and_manifest_is_refused_not_initialised(ckpt):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(ckpt / WEIGHTS, "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys() if name != "model.norm.weight"}
        metadata = f.metadata()
    save_file(tensors, ckpt / WEIGHTS, metadata=metadata)
    edit_manifest(ckpt, lambda m: m["tensors"].pop("model.norm.weight"))
    resign(ckpt)
    _refused(ckpt, "missing tensors of the model: model.norm.weight")


def test_checkpoints_before_the_integration_still_load_with_load_quantized(ckpt):
    reference = logits(load_quantized(ckpt)[0])
    config = json.loads((ckpt / CONFIG).read_text())
    config["quantization_config"] = {"format": "sensiquant", "format_version": 2, "manifest": MANIFEST,
                                     "load_with": "sensiquant.load_quantized"}
    del config["transformers_weights"]
    (ckpt / CONFIG).write_text(json.dumps(config, indent=2))
    resign(ckpt)
    assert torch.equal(logits(load_quantized(ckpt, verify=True)[0]), reference)
    with pytest.raises(ValueError, match="quant_method"):  # transformers refuses them, as it always did
        AutoModelForCausalLM.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------------- the model card


def test_model_card_describes_the_checkpoint(checkpoints):
    path = checkpoints["mixed"]
    card = (path / "README.md").read_text()
    manifest = read_manifest(path)
    assert "README.md" in manifest["extra_files"] and manifest["card"] == {"base_model": "tiny/llama"}
    assert "base_model: tiny/llama" in card and "| base model | `tiny/llama` |" in card
    assert f"{manifest['summary']['bits_per_param']:.4f}" in card
    assert "Layers per bit width: 2-bit: 1, 3-bit: 1, 4-bit: 11, 8-bit: 1." in card
    assert "| 8 | per-channel | FP16 | - | 1 |" in card and "| 2 | 32 | FP16 | csr | 1 |" in card
    assert "magnitude" in card and "| per-layer overrides | 3 |" in card and "| calibration | none |" in card
    assert "import sensiquant" in card and 'AutoModelForCausalLM.from_pretrained("' in card
    assert "Perplexity" not in card  # nothing was measured


def test_an_edited_card_still_loads_and_verify_tells(ckpt):
    (ckpt / "README.md").write_text((ckpt / "README.md").read_text() + "\nNotes of the hub page.\n")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(ckpt)), logits(load_quantized(ckpt)[0]))
    with pytest.raises(SensiquantError, match="README.md is not the file this checkpoint was saved with"):
        verify_checkpoint(ckpt)


def test_model_card_shows_measured_perplexity(tiny_llama, tmp_path):
    result = {"ppl": 123.456789, "nll": 4.8, "n_windows": 3, "seqlen": 128, "n_tokens": 381, "seconds": 0.1}
    model, tok, report = sq.api.quantize(str(tiny_llama), sq.LayerSpec(bits=4), tmp_path / "q", progress=False,
                                         evaluate=lambda m, t: {"sample.txt": result})
    card = (tmp_path / "q" / "README.md").read_text()
    assert "| sample.txt | 3 | 128 | 123.4568 |" in card
    assert read_manifest(tmp_path / "q")["card"] == {"base_model": str(tiny_llama),
                                                     "perplexity": {"sample.txt": result}}
    with pytest.raises(SensiquantError, match="a positive ppl"):
        save_quantized(model, tok, tmp_path / "r", sq.QuantConfig(), report,
                       card={"perplexity": {"x": {"ppl": float("nan")}}})
    with pytest.raises(SensiquantError, match="must be a plain file name other than"):
        save_quantized(model, tok, tmp_path / "s", sq.QuantConfig(), report, extra_files={"README.md": "mine"})
    assert not (tmp_path / "r").exists() and not (tmp_path / "s").exists()


def test_cli_quantize_puts_its_perplexity_on_the_card(tiny_llama, text_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["quantize", str(tiny_llama), "--method", "rtn", "--out", str(out), "--ppl", str(text_file),
                 "--seqlen", "128", "--json", "--quiet"]) == 0
    q = json.loads(capsys.readouterr().out)
    measured = q["ppl"][str(text_file)]
    assert read_manifest(out)["card"]["perplexity"][str(text_file)] == measured
    assert f"| {text_file} | {measured['n_windows']} | 128 | {measured['ppl']:.4f} |" in (out / "README.md").read_text()
    assert read_manifest(out)["card"]["base_model"] == str(tiny_llama)
