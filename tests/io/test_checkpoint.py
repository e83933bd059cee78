"""Checkpoints: written atomically, self-describing (manifest format 2), checked on every load; every damaged or
mismatched checkpoint is one SensiquantError (or, for tensor bytes, caught by verify), never a wrong model."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from checkpoint_tools import (
    checkpoint_pair,
    edit_manifest,
    logits,
    read_raw_safetensors,
    references,
    resign,
    to_format_1,
    write_raw_safetensors,
)

import sensiquant.io.checkpoint as checkpoint
from sensiquant import SensiquantError
from sensiquant.io import atomic, load_model, load_quantized, read_manifest, save_quantized, verify_checkpoint
from sensiquant.io.atomic import temporary_siblings
from sensiquant.io.checkpoint import MANIFEST, QUANTIZATION_MARKER, WEIGHTS
from sensiquant.io.safetensors import read_safetensors_header
from sensiquant.pipeline import QuantConfig


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    return checkpoint_pair(tiny_llama, tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def reference(checkpoints):
    return references(checkpoints)


@pytest.fixture
def ckpt(checkpoints, tmp_path):
    """A fresh copy of checkpoint A to damage."""
    return shutil.copytree(checkpoints[0], tmp_path / "ckpt")


def _saved(path):
    """(model, tokenizer, config, report) of a checkpoint, ready to be saved again."""
    model, tok = load_quantized(path)
    return model, tok, QuantConfig.from_dict(read_manifest(path)["config"]), model.sensiquant_report


def _save(saved, out, **kwargs):
    model, tok, config, report = saved
    return save_quantized(model, tok, out, config, report, **kwargs)


def _fails(path, *needles, loader=load_model):
    with pytest.raises(SensiquantError) as info:
        loader(str(path))
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


# ------------------------------------------------------------------------------------------------- what is written


def test_format_2_manifest_describes_every_tensor_and_file(ckpt, reference):
    manifest = read_manifest(ckpt)
    header = read_safetensors_header(ckpt / WEIGHTS)
    assert manifest["format_version"] == 2
    assert manifest["tensors"] == {name: {"dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}
                                   for name, t in header.tensors.items()}
    assert manifest["weights_sha256"] == hashlib.sha256((ckpt / WEIGHTS).read_bytes()).hexdigest()
    assert set(manifest["files"]) == {"config.json", "tokenizer.json", "tokenizer_config.json"}
    assert set(manifest["extra_files"]) == {"plan.json", "README.md"}
    for name, record in {**manifest["files"], **manifest["extra_files"]}.items():
        assert record["sha256"] == hashlib.sha256((ckpt / name).read_bytes()).hexdigest()
    assert any(name.endswith(".outlier_row_ptr") for name in header.tensors)  # every kind of tensor is there
    assert any(name.endswith(".scale_qscale") for name in header.tensors)
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"] == QUANTIZATION_MARKER
    summary = verify_checkpoint(ckpt)
    assert summary["sha256_ok"] is True and summary["tensors"] == len(header.tensors)
    assert summary["bytes"] == (ckpt / WEIGHTS).stat().st_size and summary["unlisted_files"] == []
    model, _ = load_quantized(ckpt, verify=True)
    assert torch.equal(logits(model), reference["A"])


def test_config_json_names_sensiquants_quantizer(ckpt):
    from transformers import AutoConfig

    # transformers hands the checkpoint to sensiquant's quantizer, or refuses it without sensiquant (test_hf.py)
    assert AutoConfig.from_pretrained(ckpt).quantization_config["quant_method"] == "sensiquant"


# -------------------------------------------------------------------------------------------------- atomic saving


def test_save_over_a_checkpoint_replaces_it_whole(checkpoints, tmp_path, reference):
    a, b = checkpoints
    out = shutil.copytree(a, tmp_path / "out")
    _save(_saved(b), out)
    model, _ = load_quantized(out, verify=True)
    assert torch.equal(logits(model), reference["B"])
    assert not (out / "plan.json").exists()  # nothing of A is left beside B
    assert temporary_siblings(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_old_checkpoint_stays_loadable_until_the_swap(checkpoints, tmp_path, reference, monkeypatch):
    a, b = checkpoints
    out = shutil.copytree(a, tmp_path / "out")
    seen = {}
    swap = atomic._put_in_place

    def check_then_swap(tmp, target):
        seen["old"] = logits(load_quantized(target, verify=True)[0])  # the old one, intact
        seen["new"] = logits(load_quantized(tmp, verify=True)[0])  # the new one, complete
        swap(tmp, target)

    monkeypatch.setattr(atomic, "_put_in_place", check_then_swap)
    _save(_saved(b), out)
    assert torch.equal(seen["old"], reference["A"]) and torch.equal(seen["new"], reference["B"])
    assert torch.equal(logits(load_quantized(out)[0]), reference["B"])


@pytest.mark.parametrize("exchange", [True, False])
def test_save_into_new_empty_and_existing_directories(checkpoints, tmp_path, reference, monkeypatch,
                                                      exchange):
    monkeypatch.setattr(atomic, "USE_RENAME_EXCHANGE", exchange)  # False: the rename-aside fallback
    a, b = checkpoints
    saved_a, saved_b = _saved(a), _saved(b)
    new = tmp_path / "deep" / "new"
    _save(saved_a, new)
    (tmp_path / "empty").mkdir()
    _save(saved_b, tmp_path / "empty")
    _save(saved_b, new)
    for path, name in ((new, "B"), (tmp_path / "empty", "B")):
        assert torch.equal(logits(load_quantized(path, verify=True)[0]), reference[name])
        assert temporary_siblings(path) == []
    link = tmp_path / "link"
    link.symlink_to(new)
    _save(saved_a, link)  # through a symlink: the directory it points to is replaced
    assert link.is_symlink() and torch.equal(logits(load_quantized(link)[0]), reference["A"])


def test_save_refuses_a_non_empty_directory_that_is_not_a_checkpoint(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SensiquantError, match="not empty and not a sensiquant checkpoint"):
        _save(_saved(checkpoints[0]), out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and temporary_siblings(out) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "under"):
        with pytest.raises(SensiquantError):
            _save(_saved(checkpoints[0]), target)
    assert blocker.read_text() == "x"


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temporary(checkpoints, tmp_path, reference,
                                                                   monkeypatch):
    a, b = checkpoints
    out = shutil.copytree(a, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full)
    with pytest.raises(SensiquantError, match="No space left on device"):
        _save(_saved(b), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert temporary_siblings(out) == [] and torch.equal(logits(load_quantized(out)[0]), reference["A"])


def test_the_next_save_removes_what_a_killed_save_left(checkpoints, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.sensiquant-{int(dead.stdout)}-0123abcd.tmp"
    live = tmp_path / f".out.sensiquant-{os.getppid()}-89abcdef.tmp"  # a save still running elsewhere
    other = tmp_path / f".other.sensiquant-{int(dead.stdout)}-0123abcd.tmp"  # belongs to another target
    for path in (stale, live, other):
        path.mkdir()
        (path / WEIGHTS).write_bytes(b"partial")
    assert set(temporary_siblings(out)) == {stale, live}
    _save(_saved(checkpoints[1]), out)
    assert not stale.exists() and live.exists() and other.exists()


def test_extra_files_are_checked_names_and_checksums(checkpoints, tmp_path):
    saved = _saved(checkpoints[1])
    for bad in ("../x.json", "sub/x.json", ".hidden", MANIFEST, WEIGHTS, "config.json", "tokenizer.json"):
        with pytest.raises(SensiquantError):
            _save(saved, tmp_path / "out", extra_files={bad: "{}"})
        assert not (tmp_path / "out").exists() and temporary_siblings(tmp_path / "out") == []
    out = _save(saved, tmp_path / "out", extra_files={"plan.json": '{"a": 1}'})
    assert (out / "plan.json").read_text() == '{"a": 1}'
    (out / "plan.json").write_text('{"a": 2}')
    load_quantized(out)  # extra files do not take part in loading...
    with pytest.raises(SensiquantError, match="plan.json"):
        verify_checkpoint(out)  # ...but verify checks them


# --------------------------------------------------------------------------------------- damaged weights file


@pytest.mark.parametrize("size", [0, 5, 8, 100, -1, -1000])
def test_truncated_or_empty_weights(ckpt, size):
    data = (ckpt / WEIGHTS).read_bytes()
    (ckpt / WEIGHTS).write_bytes(data[:size] if size >= 0 else data[:len(data) + size])
    _fails(ckpt, WEIGHTS)
    with pytest.raises(SensiquantError):
        verify_checkpoint(ckpt)


def test_out_of_range_offsets_and_huge_header_length(ckpt):
    header, body = read_raw_safetensors(ckpt / WEIGHTS)
    name = next(n for n in header if n.endswith(".qweight"))
    begin, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [begin, end + 10**9]
    write_raw_safetensors(ckpt / WEIGHTS, header, body)
    _fails(ckpt, "outside the data section", name)
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    _fails(ckpt, "exceeds the limit")


def test_flipped_tensor_bytes_are_caught_by_verify(ckpt, reference):
    header = read_safetensors_header(ckpt / WEIGHTS)
    info = header.tensors["model.layers.0.self_attn.q_proj.qweight"]
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[header.data_start + info.begin + 17] ^= 0x10
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    model, _ = load_model(str(ckpt))  # the cheap checks cannot see a changed code...
    assert not torch.equal(logits(model), reference["A"])
    with pytest.raises(SensiquantError, match="does not match the sha256"):
        verify_checkpoint(ckpt)  # ...the checksum does
    for loader in (lambda p: load_quantized(p, verify=True), lambda p: load_model(p, verify=True)):
        _fails(ckpt, "does not match the sha256", loader=loader)


# ---------------------------------------------------------------------------------------------- damaged manifest


def test_invalid_manifest_json(ckpt):
    text = (ckpt / MANIFEST).read_text()
    for broken in (text[: len(text) // 2], "", "[]", '{"format_version": 2}', text.replace('"layers"', '"layerz"')):
        (ckpt / MANIFEST).write_text(broken)
        _fails(ckpt, MANIFEST)


def _layer_bits(bits):
    def edit(manifest):
        manifest["layers"]["model.layers.0.self_attn.q_proj"]["spec"]["bits"] = bits
    return edit


def test_bits_4_to_2_in_the_manifest_is_caught_not_decoded(ckpt):
    edit_manifest(ckpt, _layer_bits(2))
    _fails(ckpt, "model.layers.0.self_attn.q_proj", "stored bits")
    # even with the stored bits and every checksum rewritten to match (a buggy writer), the packed byte count tells
    def consistent(manifest):
        layer = manifest["layers"]["model.layers.0.self_attn.q_proj"]
        from sensiquant.format import LayerSpec, storage_bits

        layer["bits"] = storage_bits(tuple(layer["shape"]), LayerSpec.from_dict(layer["spec"]), layer["n_outliers"])
    edit_manifest(ckpt, consistent)
    resign(ckpt)
    _fails(ckpt, "model.layers.0.self_attn.q_proj", "qweight is U8 [4608], its spec and shape need U8 [2304]")


def test_bits_4_to_2_in_a_format_1_checkpoint(ckpt, reference):
    to_format_1(ckpt)
    model, _ = load_model(str(ckpt))  # format 1 still loads...
    assert torch.equal(logits(model), reference["A"])
    summary = verify_checkpoint(ckpt)
    assert summary["sha256_ok"] is None and "no checksum" in summary["checksum"]
    edit_manifest(ckpt, _layer_bits(2))  # ...and its structure is still checked
    _fails(ckpt, "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("field, value, needle", [
    ("shape", [96, 1], "the manifest says F16 [96, 1]"),
    ("dtype", "F32", "the manifest says F32"),
    ("nbytes", 4, "nbytes 4 does not match"),
])
def test_manifest_tensor_shape_or_dtype_changed(ckpt, field, value, needle):
    name = "model.layers.1.self_attn.k_proj.scale"

    def edit(manifest):
        manifest["tensors"][name][field] = value
        if field != "nbytes":  # keep the entry self-consistent: only the comparison with the file can tell
            entry = manifest["tensors"][name]
            entry["nbytes"] = (4 if entry["dtype"] == "F32" else 2) * entry["shape"][0] * entry["shape"][1]
    edit_manifest(ckpt, edit)
    _fails(ckpt, needle)
    resign(ckpt)
    _fails(ckpt, needle)


def test_decoding_fields_the_structure_cannot_see_are_caught_by_the_checksums(ckpt):
    # 96 inputs in groups of 33 is still 3 groups a row: the same tensors, decoded into other weights
    def edit(manifest):
        manifest["layers"]["model.layers.0.self_attn.q_proj"]["spec"]["group_size"] = 33
    edit_manifest(ckpt, edit)
    _fails(ckpt, "does not match its own checksum")
    # with the manifest's own checksum redone, the weights file still records which manifest it was written with
    edit_manifest(ckpt, lambda m: m.update(manifest_sha256=checkpoint._manifest_digest(m)))
    _fails(ckpt, "does not belong to")


def test_weights_and_manifest_of_two_saves_are_refused(checkpoints, tmp_path):
    a, b = checkpoints
    for name in (MANIFEST, WEIGHTS):  # as a save killed between its files used to leave
        mixed = shutil.copytree(a, tmp_path / name)
        shutil.copyfile(b / name, mixed / name)
        _fails(mixed)


def test_outlier_index_corruption_is_caught_at_load(ckpt):
    header, body = read_raw_safetensors(ckpt / WEIGHTS)
    name = "model.layers.0.self_attn.q_proj.outlier_row_ptr"
    begin, _ = header[name]["data_offsets"]
    body = bytearray(body)
    body[begin + 5] = 250  # one row pointer far past nnz
    write_raw_safetensors(ckpt / WEIGHTS, header, bytes(body))
    resign(ckpt)
    _fails(ckpt, "model.layers.0.self_attn.q_proj", "outlier row pointers")


# ------------------------------------------------------------------------------------------- missing files


def test_deleted_config_json(ckpt):
    (ckpt / "config.json").unlink()
    _fails(ckpt, "config.json is missing")


def test_deleted_tokenizer_file(ckpt):
    (ckpt / "tokenizer.json").unlink()
    _fails(ckpt, "tokenizer.json is missing")


def test_quantized_tensors_without_a_manifest_are_never_a_random_model(ckpt):
    (ckpt / MANIFEST).unlink()
    _fails(ckpt, "without its sensiquant.json")
    _fails(ckpt, "not a sensiquant checkpoint", loader=load_quantized)
    config = json.loads((ckpt / "config.json").read_text())
    del config["quantization_config"]  # a format-1 checkpoint without its manifest: the packed tensors tell
    (ckpt / "config.json").write_text(json.dumps(config))
    _fails(ckpt, "holds quantized tensors", ".qweight", "no sensiquant.json")


def test_foreign_quantized_and_plain_models_still_load(tiny_llama, tmp_path):
    from sensiquant.io import refuse_incomplete_checkpoint

    model, tok = load_model(str(tiny_llama))
    assert model is not None and tok is not None
    foreign = shutil.copytree(tiny_llama, tmp_path / "gptq")
    config = json.loads((foreign / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (foreign / "config.json").write_text(json.dumps(config))
    refuse_incomplete_checkpoint(foreign)  # another tool's quantization is transformers' business


def test_not_a_directory(tmp_path):
    _fails(tmp_path / "nothing", "not a directory", loader=load_quantized)
    with pytest.raises(SensiquantError, match="not a directory"):
        verify_checkpoint(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------------- block outliers


BLOCK_LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def block_checkpoint(tiny_llama, tmp_path_factory):
    """Block outliers everywhere but the down projections (CSR): (path, logits of the model that was saved)."""
    import sensiquant as sq
    from sensiquant.methods.outliers import OutlierConfig

    spec = sq.LayerSpec(grid="rtn", bits=4, group_size=32, outlier_ratio=0.02, outlier_format="block")
    config = sq.QuantConfig(default=spec, overrides={f"model.layers.{i}.mlp.down_proj": spec.replace(
        grid="hqq", bits=3, group_size=64, quant_meta=True, outlier_format="csr") for i in range(2)},
        outliers=OutlierConfig("magnitude"))
    out = tmp_path_factory.mktemp("block") / "ckpt"
    model, _, report = sq.api.quantize(str(tiny_llama), config, out_dir=out, progress=False)
    return out, logits(model), report


@pytest.fixture
def block_ckpt(block_checkpoint, tmp_path):
    return shutil.copytree(block_checkpoint[0], tmp_path / "block")


def test_block_outliers_save_load_and_verify(block_checkpoint):
    path, saved_logits, report = block_checkpoint
    header = read_safetensors_header(path / WEIGHTS)
    manifest = read_manifest(path)
    layer = manifest["layers"][BLOCK_LAYER]
    assert layer["spec"]["outlier_format"] == "block" and layer["n_outliers"] > 0
    assert {f"{BLOCK_LAYER}.outlier_{leaf}" for leaf in ("counts", "offsets", "codes", "scale")} <= set(header.tensors)
    assert not any(name.startswith(BLOCK_LAYER + ".outlier_values") for name in header.tensors)
    assert "model.layers.0.mlp.down_proj.outlier_values" in header.tensors  # CSR beside block in one checkpoint
    assert verify_checkpoint(path)["sha256_ok"] is True
    model, _ = load_quantized(path, verify=True)
    assert torch.equal(logits(model), saved_logits)
    layer = model.get_submodule(BLOCK_LAYER)
    assert layer.spec.outlier_format == "block" and layer.n_outliers == report.layers[BLOCK_LAYER].n_outliers
    # the accounting: cheaper than the same outliers in CSR
    csr = layer.spec.replace(outlier_format="csr")
    from sensiquant.format import storage_bits

    assert layer.storage_bits() < storage_bits((layer.out_features, layer.in_features), csr, layer.n_outliers)


def test_manifests_without_outlier_format_read_as_csr(ckpt, reference):
    """Manifests written before block outliers existed have no outlier_format: their (CSR) layers read as CSR."""
    def strip(manifest):
        for entry in manifest["layers"].values():
            if entry["spec"].get("outlier_format") == "csr":
                entry["spec"].pop("outlier_format")
        for spec in (manifest["config"]["default"], *manifest["config"]["overrides"].values()):
            if spec.get("outlier_format") == "csr":
                spec.pop("outlier_format")
    edit_manifest(ckpt, strip)
    resign(ckpt)
    model, _ = load_quantized(ckpt, verify=True)
    assert torch.equal(logits(model), reference["A"])
    formats = [m.spec.outlier_format for m in model.modules() if hasattr(m, "spec")]
    assert formats.count("block") == 2 and set(formats) == {"csr", "block"}  # A's two down projections are block


def _edit_tensor(path, name, edit):
    """Change one stored tensor's values in place (same dtype and shape), then redo every checksum."""
    header, body = read_raw_safetensors(path / WEIGHTS)
    begin, end = header[name]["data_offsets"]
    dtype = {"U8": torch.uint8, "I8": torch.int8, "F16": torch.float16}[header[name]["dtype"]]
    tensor = torch.frombuffer(bytearray(body[begin:end]), dtype=dtype).clone()
    edit(tensor)
    write_raw_safetensors(path / WEIGHTS, header, body[:begin] + tensor.numpy().tobytes() + body[end:])
    resign(path)


def _first_block_with(tensor, at_least):
    return int(torch.nonzero(tensor.long() >= at_least)[0])


def _swap_two_offsets(offsets):
    offsets[0], offsets[1] = int(offsets[1]), int(offsets[0])


@pytest.mark.parametrize("leaf, edit, needle", [
    ("counts", lambda t: t.__setitem__(_first_block_with(t, 1), int(t[_first_block_with(t, 1)]) - 1),
     "outlier block counts add up to"),
    ("counts", lambda t: t.__setitem__(0, int(t[0]) + 1), "outlier block counts add up to"),
    ("offsets", lambda t: t.fill_(0), "do not ascend within their blocks"),
    ("scale", lambda t: t.fill_(float("inf")), "is not a finite positive number"),
    ("scale", lambda t: t.fill_(float("nan")), "is not a finite positive number"),
    ("scale", lambda t: t.fill_(0.0), "is not a finite positive number"),
    ("scale", lambda t: t.fill_(-0.5), "is not a finite positive number"),
])
def test_block_outlier_corruption_is_caught_at_load(block_ckpt, leaf, edit, needle):
    _edit_tensor(block_ckpt, f"{BLOCK_LAYER}.outlier_{leaf}", edit)
    _fails(block_ckpt, BLOCK_LAYER, needle)
    with pytest.raises(SensiquantError, match=needle):
        verify_checkpoint(block_ckpt)


def test_swapped_block_offsets_are_caught(block_ckpt):
    header, body = read_raw_safetensors(block_ckpt / WEIGHTS)
    assert body[header[f"{BLOCK_LAYER}.outlier_counts"]["data_offsets"][0]] >= 2  # two offsets of block 0 to swap
    _edit_tensor(block_ckpt, f"{BLOCK_LAYER}.outlier_offsets", _swap_two_offsets)
    _fails(block_ckpt, BLOCK_LAYER, "do not ascend within their blocks")


def test_block_offsets_past_the_matrix_end_are_caught():
    from sensiquant.format import LayerSpec
    from sensiquant.pipeline.report import LayerReport

    spec = LayerSpec(bits=3, outlier_ratio=0.01, outlier_format="block")
    layer = LayerReport((10, 77), spec, 0, 2)  # 770 weights: the last block of 255 holds positions 765-769 only
    tensors = {"outlier_counts": torch.tensor([0, 0, 1, 1], dtype=torch.uint8),
               "outlier_offsets": torch.tensor([5, 1], dtype=torch.uint8),
               "outlier_codes": torch.tensor([3, -4], dtype=torch.int8),
               "outlier_scale": torch.tensor([0.01], dtype=torch.float16)}
    checkpoint._check_outliers("m", tensors, layer, WEIGHTS)  # 515 and 766: inside
    tensors["outlier_offsets"][1] = 5  # 770: one past the end
    with pytest.raises(SensiquantError, match="fall outside the 10x77 matrix"):
        checkpoint._check_outliers("m", tensors, layer, WEIGHTS)


def test_outlier_format_changed_in_the_manifest_is_caught(block_ckpt):
    def to_csr(manifest):
        manifest["layers"][BLOCK_LAYER]["spec"]["outlier_format"] = "csr"
    edit_manifest(block_ckpt, to_csr)
    _fails(block_ckpt, BLOCK_LAYER, "stored bits")
    edit_manifest(block_ckpt, lambda m: m["layers"][BLOCK_LAYER].update(bits=_csr_bits(m["layers"][BLOCK_LAYER])))
    resign(block_ckpt)
    _fails(block_ckpt, BLOCK_LAYER, "has no outlier_values tensor")
    edit_manifest(block_ckpt, lambda m: m["layers"][BLOCK_LAYER]["spec"].update(outlier_format="coo"))
    _fails(block_ckpt, BLOCK_LAYER, "unknown outlier format 'coo'")


def _csr_bits(layer):
    from sensiquant.format import LayerSpec, storage_bits

    return storage_bits(tuple(layer["shape"]), LayerSpec.from_dict(layer["spec"]), layer["n_outliers"])
