"""A small seeded run of the checkpoint fuzzer (bench/fuzz_checkpoint.py runs 1000): every mutation is rejected at
load, caught by verify, or harmless; none is a traceback, a hang, or a model that silently computes other logits."""

import shutil

import pytest
from checkpoint_tools import checkpoint_pair, references, resign

from bench.fuzz_checkpoint import CLASSES, classify, run_fuzz
from sensiquant.io import load_quantized
from sensiquant.io.checkpoint import WEIGHTS
from sensiquant.io.safetensors import read_safetensors_header


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    return checkpoint_pair(tiny_llama, tmp_path_factory.mktemp("checkpoints"))


def test_fuzzed_checkpoints_never_fail_silently(checkpoints, tmp_path):
    a, b = checkpoints
    result = run_fuzz(a, b, tmp_path / "fuzz", n=100, seed=1, case_timeout=60)
    assert result["failures"] == [], result["failures"][:3]
    assert sum(result["classes"].values()) == 100 and set(result["classes"]) == set(CLASSES)
    assert result["classes"]["rejected_at_load"] > 50 and result["classes"]["caught_by_verify"] > 0


def test_the_classifier_sees_silent_damage(checkpoints, tmp_path):
    reference = references(checkpoints)
    forged = shutil.copytree(checkpoints[0], tmp_path / "forged")
    header = read_safetensors_header(forged / WEIGHTS)
    info = header.tensors["model.layers.1.mlp.up_proj.qweight"]
    data = bytearray((forged / WEIGHTS).read_bytes())
    data[header.data_start + info.begin + 3] ^= 0x01
    (forged / WEIGHTS).write_bytes(bytes(data))
    assert classify(forged, reference["A"])[0] == "caught_by_verify"
    resign(forged)  # damage with every checksum redone: only the logits can tell
    cls, message = classify(forged, reference["A"])
    assert cls == "FAILURE" and "logits differ" in message
    assert classify(checkpoints[0], reference["A"]) == ("equal_logits", "")
    assert load_quantized(forged)[0] is not None


def test_the_harness_counts_hangs_and_crashes(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("SENSIQUANT_FUZZ_SELFTEST", "hang=1,crash=3")
    a, b = checkpoints
    result = run_fuzz(a, b, tmp_path / "fuzz", n=5, seed=0, case_timeout=5)
    failures = {r["i"]: r["message"] for r in result["failures"]}
    assert set(failures) == {1, 3} and "hang" in failures[1] and "died" in failures[3]
    assert sum(result["classes"].values()) == 5
