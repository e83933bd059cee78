"""Streaming (one block's weights in memory at a time): the same checkpoint as the in-memory run, the same
gradient scores as the whole-model backward, resume after kill -9, and one error line for what it cannot do."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sensiquant import api
from sensiquant.calib import gradient_statistics
from sensiquant.calib.streamed import streamed_gradient_statistics
from sensiquant.calib.windows import CalibConfig
from sensiquant.errors import SensiquantError
from sensiquant.io import load_model
from sensiquant.io.checkpoint import WEIGHTS
from sensiquant.io.streamed import TensorSource, open_streamed
from sensiquant.pipeline import gwq, recipe
from sensiquant.pipeline.resume import FAULT_ENV, resume_dir
from sensiquant.runtime.walk import find_linears

REPO = Path(__file__).resolve().parents[2]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _calib(text_file) -> CalibConfig:
    return CalibConfig(source=str(text_file), samples=2, seqlen=64)


def test_skeleton_holds_no_block_weights_until_a_block_is_loaded(tiny_llama):
    streamed = open_streamed(str(tiny_llama), progress=False)
    weights = [p for n, p in streamed.model.named_parameters() if n.startswith(streamed.prefix + ".")]
    assert weights and all(p.device.type == "meta" for p in weights)
    embed = streamed.model.get_input_embeddings()
    assert embed.weight.device.type == "meta"  # read only while it is used
    full, _ = load_model(str(tiny_llama))
    with streamed.part("head") as head:  # tied: the head is the embedding
        assert torch.equal(head.weight, full.get_output_embeddings().weight)
        assert embed.weight is head.weight
    assert embed.weight.device.type == "meta" and streamed.head.weight.device.type == "meta"
    with streamed.block(1) as block:
        for name, p in block.named_parameters():
            assert torch.equal(p, full.get_submodule(f"{streamed.prefix}.1").get_parameter(name))
    assert all(p.device.type == "meta" for p in streamed.blocks[1].parameters())


def test_streamed_gradient_scores_equal_the_whole_model_backward(tiny_llama, text_file, tmp_path):
    from sensiquant.calib import calibration_windows

    full, tokenizer = load_model(str(tiny_llama))
    windows = calibration_windows(tokenizer, _calib(text_file))
    layers = find_linears(full, ("lm_head", "*embed*"))
    whole = gradient_statistics(full, windows, layers, torch.float32, progress=False, blockwise=False)
    streamed = open_streamed(str(tiny_llama), progress=False)
    got: dict = {}
    loss, _ = streamed_gradient_statistics(streamed, windows, list(layers),
                                           lambda i, a, s: got.update({n: (a[n], s[n]) for n in a}),
                                           tmp_path / "scratch", torch.float32, progress=False)
    assert set(got) == set(layers)
    assert loss == pytest.approx(whole.loss, rel=1e-5)
    for name in layers:
        torch.testing.assert_close(got[name][0], whole.abs_sum[name], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got[name][1], whole.sq_sum[name], rtol=1e-4, atol=1e-10)


@pytest.fixture(scope="module")
def untied_llama(tmp_path_factory):
    from bench.tiny_model import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("untied"), tied=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,tied", [("gwq", True), ("hqq", True), ("gwq", False)])
def test_streamed_checkpoint_equals_the_in_memory_one(tiny_llama, untied_llama, text_file, tmp_path, method, tied,
                                                      device):
    config = gwq(calib=_calib(text_file)) if method == "gwq" else recipe("hqq")
    model = str(tiny_llama if tied else untied_llama)
    api.quantize(model, config, tmp_path / "memory", progress=False, device=device)
    _, _, report = api.quantize(model, config, tmp_path / "streamed", progress=False, stream=True, device=device)
    assert report.extra["streamed"] is True
    assert _sha(tmp_path / "memory" / WEIGHTS) == _sha(tmp_path / "streamed" / WEIGHTS)


def _quantize(model: Path, text: Path, out: Path, fault: str | None = None, *extra: str, **env_extra: str):
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_extra}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    command = [sys.executable, "-m", "sensiquant", "quantize", str(model), "--out", str(out), "--quiet", "--stream",
               "--method", "gwq", "--calib", str(text), "--calib-samples", "2", "--calib-seqlen", "64", *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=600)


def test_streamed_run_killed_three_times_resumes_to_the_same_checkpoint(tiny_llama, text_file, tmp_path):
    reference = tmp_path / "reference"
    done = _quantize(tiny_llama, text_file, reference)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "ckpt"
    for fault in ("gradients", "block:0", "block:1"):
        killed = _quantize(tiny_llama, text_file, out, fault)
        assert killed.returncode == -9, killed.stderr
        assert not out.exists() and resume_dir(out).is_dir()
    done = _quantize(tiny_llama, text_file, out)
    assert done.returncode == 0, done.stderr
    assert _sha(out / WEIGHTS) == _sha(reference / WEIGHTS)
    assert not resume_dir(out).exists()


def test_sigterm_leaves_neither_scratch_nor_checkpoint(tiny_llama, text_file, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "ckpt"
    stopped = _quantize(tiny_llama, text_file, out, "block:0+term", "--no-resume", TMPDIR=str(scratch))
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == "sensiquant: terminated"
    assert list(scratch.iterdir()) == [] and not out.exists() and not resume_dir(out).exists()


def test_streaming_refuses_what_it_cannot_do_in_one_line(tiny_llama):
    from sensiquant.methods.signround import SignRoundConfig

    config = recipe("hqq").replace(tuning=SignRoundConfig(iters=1))
    with pytest.raises(SensiquantError, match="streaming does not support block tuning"):
        api.quantize(str(tiny_llama), config, progress=False, stream=True)
    with pytest.raises(SensiquantError, match="streaming needs a local model"):
        open_streamed("no/such-model", progress=False)


def test_streaming_refuses_a_decoder_whose_head_is_more_than_norm_and_linear(tiny_llama, tmp_path):
    import json
    import shutil

    folder = Path(shutil.copytree(tiny_llama, tmp_path / "cohere"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "cohere"}))  # its logits are scaled
    with pytest.raises(SensiquantError, match="streaming supports the decoders .* not 'cohere'"):
        open_streamed(str(folder), progress=False)


def test_tensor_source_reads_copies_and_knows_its_files(tiny_llama):
    source = TensorSource(tiny_llama)
    name = next(iter(source.names()))
    a = source.read([name])[name]
    a.zero_()
    assert not torch.equal(source.read([name])[name], a) or a.abs().sum() == 0
    assert len(source.fingerprint()) == 64
    with pytest.raises(SensiquantError, match="no tensor"):
        source.read(["missing.weight"])


def test_streamed_perplexity_equals_the_in_memory_one(tiny_llama, text_file):
    from sensiquant.eval.perplexity import chunked_nll, nll_of_windows, streamed_nll, tokenize_windows

    full, tokenizer = load_model(str(tiny_llama))
    windows = tokenize_windows(tokenizer, text_file.read_text(), 64, 3)
    total, count = nll_of_windows(full, windows)
    got, got_count = streamed_nll(open_streamed(str(tiny_llama), progress=False), windows)
    assert got_count == count and got == pytest.approx(total, rel=1e-5)
    ids = windows[:1]
    with torch.no_grad():
        hidden = full.base_model(ids).last_hidden_state
        whole = torch.nn.functional.cross_entropy(full(ids).logits[0, :-1], ids[0, 1:], reduction="sum")
        assert chunked_nll(full.get_output_embeddings(), hidden, ids, chunk=5) == pytest.approx(float(whole),
                                                                                             rel=1e-5)


def test_streamed_perplexity_of_a_quantized_model_dequantizes_each_layer_once(tiny_llama, text_file, tmp_path,
                                                                             monkeypatch):
    from sensiquant.eval.perplexity import nll_of_windows, tokenize_windows
    from sensiquant.runtime.qlinear import QuantLinear

    calls, seen = [], {}
    dequantize = QuantLinear.dequantize
    monkeypatch.setattr(QuantLinear, "dequantize", lambda self, *a: calls.append(self) or dequantize(self, *a))

    def evaluate(model, tokenizer):  # before the checkpoint is written: the model is still streamed
        windows = tokenize_windows(tokenizer, text_file.read_text(), 64, 3)
        calls.clear()
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        seen.update(windows=windows, nll=nll_of_windows(model, windows), calls=len(calls), layers=len(layers),
                    held=[m._held for m in layers if m._held is not None])
        return {}

    api.quantize(str(tiny_llama), recipe("hqq"), tmp_path / "q", progress=False, stream=True, evaluate=evaluate)
    assert seen["calls"] == seen["layers"] == 14 and not seen["held"]  # each layer once, then released
    windows, (got, count) = seen["windows"], seen["nll"]
    calls.clear()
    want, want_count = nll_of_windows(load_model(str(tmp_path / "q"))[0], windows)  # in memory: per window
    assert len(calls) == 3 * seen["layers"]
    assert count == want_count and got == pytest.approx(want, rel=1e-5)


def test_cli_eval_stream(tiny_llama, text_file):
    from sensiquant.cli.main import main

    assert main(["eval", str(tiny_llama), "--stream", "--ppl", str(text_file), "--seqlen", "64", "--quiet"]) == 0
