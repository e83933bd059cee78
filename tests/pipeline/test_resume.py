"""Resume: kill -9 at a stage of a calibrated run, run the same command again, get the very same checkpoint."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sensiquant import api
from sensiquant.io import load_quantized
from sensiquant.io.checkpoint import WEIGHTS
from sensiquant.pipeline import gwq
from sensiquant.pipeline.resume import FAULT_ENV, GRADIENTS, JOB, ResumeState, resume_dir
from sensiquant.runtime.walk import find_linears

REPO = Path(__file__).resolve().parents[2]


def _quantize(model: Path, text: Path, out: Path, *flags: str, fault: str | None = None):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "sensiquant", "quantize", str(model), "--out", str(out), "--quiet",
               "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "64", "--seed", "0", *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference(tiny_llama, text_file, tmp_path_factory):
    """Uninterrupted runs: GWQ (GPTQ block by block) and block-tuned GWQ."""
    refs = {}
    runs = {"gwq": ("--method", "gwq"), "tuned": ("--method", "gwq", "--tune", "--tune-iters", "3")}
    for name, flags in runs.items():
        out = tmp_path_factory.mktemp("ref") / name
        done = _quantize(tiny_llama, text_file, out, *flags)
        assert done.returncode == 0, done.stderr
        assert not resume_dir(out).exists()  # removed once the checkpoint is in place
        refs[name] = (flags, _sha(out / WEIGHTS))
    return refs


def _kept_blocks(state: Path) -> list[str]:
    return sorted(p.name for p in state.glob("block-*.safetensors"))


def test_run_killed_three_times_resumes_to_the_same_checkpoint(tiny_llama, text_file, tmp_path, reference):
    """GWQ killed after the gradient pass, then after block 0, then after block 1 (before the checkpoint is
    written), each time resumed from what the run before kept: the weights file equals the uninterrupted run's."""
    flags, expected = reference["gwq"]
    out = tmp_path / "ckpt"
    state = resume_dir(out)
    for fault, kept in (("gradients", []), ("block:0", ["block-00000.safetensors"]),
                        ("block:1", ["block-00000.safetensors", "block-00001.safetensors"])):
        killed = _quantize(tiny_llama, text_file, out, *flags, fault=fault)
        assert killed.returncode == -9, killed.stderr
        assert not out.exists()  # nothing that could load as a finished checkpoint
        assert (state / JOB).is_file() and (state / GRADIENTS).is_file()
        assert _kept_blocks(state) == kept
    done = _quantize(tiny_llama, text_file, out, *flags)
    assert done.returncode == 0, done.stderr
    assert _sha(out / WEIGHTS) == expected
    assert not state.exists()
    load_quantized(out, verify=True)


def test_killed_tuned_run_resumes_to_the_same_checkpoint(tiny_llama, text_file, tmp_path, reference):
    flags, expected = reference["tuned"]
    out = tmp_path / "ckpt"
    assert _quantize(tiny_llama, text_file, out, *flags, fault="block:0").returncode == -9
    assert _kept_blocks(resume_dir(out)) == ["block-00000.safetensors"]
    done = _quantize(tiny_llama, text_file, out, *flags)
    assert done.returncode == 0, done.stderr
    assert _sha(out / WEIGHTS) == expected


class _Stop(Exception):
    pass


def _interrupted(monkeypatch, tiny_llama, config, out):
    """Run the API until block 0 is kept, then stop it (as an interruption would)."""
    save = ResumeState.save_block

    def save_then_stop(self, i, tensors, meta):
        save(self, i, tensors, meta)
        raise _Stop

    monkeypatch.setattr(ResumeState, "save_block", save_then_stop)
    with pytest.raises(_Stop):
        api.quantize(str(tiny_llama), config, out, progress=False)
    monkeypatch.undo()
    assert _kept_blocks(resume_dir(out)) == ["block-00000.safetensors"]


def _config(text_file, **spec):
    base = gwq()
    return base.replace(calib=base.calib.replace(source=str(text_file), samples=2, seqlen=64),
                        default=base.default.replace(**spec))


def test_another_job_does_not_reuse_the_state(monkeypatch, tiny_llama, text_file, tmp_path):
    out = tmp_path / "ckpt"
    _interrupted(monkeypatch, tiny_llama, _config(text_file, bits=4), out)
    _, _, report = api.quantize(str(tiny_llama), _config(text_file), out, progress=False)
    assert "resumed" not in report.extra  # other bits: nothing kept is used
    fresh = tmp_path / "fresh"
    api.quantize(str(tiny_llama), _config(text_file), fresh, progress=False, resume=False)
    assert _sha(out / WEIGHTS) == _sha(fresh / WEIGHTS)


def test_same_job_reports_what_it_resumed(monkeypatch, tiny_llama, text_file, tmp_path):
    out = tmp_path / "ckpt"
    _interrupted(monkeypatch, tiny_llama, _config(text_file), out)
    _, _, report = api.quantize(str(tiny_llama), _config(text_file), out, progress=False)
    assert report.extra["resumed"] == ["gradients", "block 0"]


def test_no_resume_starts_afresh(monkeypatch, tiny_llama, text_file, tmp_path):
    out = tmp_path / "ckpt"
    _interrupted(monkeypatch, tiny_llama, _config(text_file), out)
    _, _, report = api.quantize(str(tiny_llama), _config(text_file), out, progress=False, resume=False)
    assert "resumed" not in report.extra
    assert not resume_dir(out).exists()


def test_state_of_another_model_is_replaced(tiny_llama, tmp_path):
    from sensiquant.io import load_model

    model, _ = load_model(str(tiny_llama))
    layers = find_linears(model, ("lm_head", "*embed*"))
    root = tmp_path / "state"
    state = ResumeState.open(root, {"a": 1}, layers)
    state.save_block(0, {"x": {"t": layers[next(iter(layers))].weight}}, {"k": 1})
    assert ResumeState.open(root, {"a": 1}, layers).has_block(0)
    assert not ResumeState.open(root, {"a": 2}, layers).has_block(0)  # another config
    state = ResumeState.open(root, {"a": 1}, layers)
    state.save_block(0, {"x": {"t": layers[next(iter(layers))].weight}}, {"k": 1})
    next(iter(layers.values())).weight.data.add_(1.0)  # other weights: another model
    assert not ResumeState.open(root, {"a": 1}, layers).has_block(0)
