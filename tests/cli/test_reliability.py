"""No silently wrong model from the command line: every bad input ends in one `sensiquant: error: ...` line (exit 2),
before any work, and leaves nothing half-written; inputs are never clobbered."""

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sensiquant.cli import build_parser, main

SMALL = ["--bits", "4", "--group-size", "32", "--quiet"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sensiquant: error: "), err
    return err[0]


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _fails(capsys, argv, *needles) -> str:
    assert main(argv) == 2
    line = _one_error_line(capsys)
    for needle in needles:
        assert needle in line, line
    return line


def test_out_at_the_source_model_is_refused_and_the_model_is_untouched(tiny_llama, tmp_path, capsys):
    source = tmp_path / "model"
    shutil.copytree(tiny_llama, source)
    before = _digest(source)
    _fails(capsys, ["quantize", str(source), "--out", str(source), *SMALL], "would overwrite the model")
    _fails(capsys, ["quantize", str(source), "--out", str(tmp_path), "--overwrite", *SMALL], "would overwrite")
    assert _digest(source) == before


def test_non_empty_out_needs_overwrite_and_a_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", str(out), *SMALL], "not empty", "--overwrite")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", str(out), "--overwrite", *SMALL], "not a sensiquant")
    assert [p.name for p in out.iterdir()] == ["plan.json"]
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama), "--out", str(ckpt), *SMALL]) == 0
    _fails(capsys, ["quantize", str(tiny_llama), "--out", str(ckpt), *SMALL], "not empty")
    assert main(["quantize", str(tiny_llama), "--out", str(ckpt), "--overwrite", "--bits", "3", "--quiet"]) == 0
    capsys.readouterr()
    _fails(capsys, ["quantize", str(tiny_llama), "--overwrite", *SMALL], "--overwrite applies only with --out")


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_at_or_under_a_file(tiny_llama, tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    out = blocker if where == "file" else blocker / "ckpt"
    _fails(capsys, ["quantize", str(tiny_llama), "--out", str(out), *SMALL], "file")
    assert blocker.read_text() == "not a directory"


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.fixture
def mounted(tmp_path):
    """tmpfs mounts (root only; skipped where mounting is not allowed), unmounted afterwards."""
    mounts = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        if not _mount_tmpfs(path, options):
            pytest.skip("mounting a tmpfs needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_read_only_out_is_refused_before_work(tiny_llama, capsys, mounted):
    ro = mounted("ro", "ro,size=1m")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", str(ro / "ckpt"), *SMALL], "cannot be written",
           "Read-only")


def test_disk_full_leaves_nothing(tiny_llama, capsys, mounted):
    small = mounted("small", "size=64k")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", str(small / "ckpt"), *SMALL], "No space left")
    assert list(small.iterdir()) == []  # no partial checkpoint, no temporary sibling


@pytest.fixture
def broken_model(tiny_llama, tmp_path):
    """The tiny model with one NaN and one Inf in a single weight."""
    path = tmp_path / "broken"
    shutil.copytree(tiny_llama, path)
    tensors = load_file(path / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][3, 5] = float("nan")
    tensors[name][7, 1] = float("inf")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("method", ["rtn", "hqq", "gwq"])
def test_non_finite_weights_are_named(broken_model, text_file, tmp_path, capsys, method):
    extra = ["--calib", str(text_file), "--calib-samples", "2", "--calib-seqlen", "64"] if method == "gwq" else []
    _fails(capsys, ["quantize", str(broken_model), "--method", method, "--out", str(tmp_path / "q"), *extra,
                    "--quiet"], "model.layers.1.mlp.up_proj", "2 non-finite")
    assert not (tmp_path / "q").exists()


def test_short_or_empty_texts_fail_before_any_work(tiny_llama, tmp_path, capsys, monkeypatch):
    import sensiquant.api as api

    def never(*args, **kwargs):
        raise AssertionError("quantized before the input was checked")

    monkeypatch.setattr(api, "load_model", never)
    short, empty = tmp_path / "short.txt", tmp_path / "empty.txt"
    short.write_text("too short")
    empty.write_text("")
    out = str(tmp_path / "q")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", out, "--ppl", str(short), *SMALL], "shorter than one window")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", out, "--ppl", str(empty), *SMALL], "shorter than one window")
    _fails(capsys, ["quantize", str(tiny_llama), "--out", out, "--ppl", "wikitext2", "--max-windows", "0", *SMALL],
           "--max-windows", "at least 1")
    _fails(capsys, ["quantize", str(tiny_llama), "--method", "gwq", "--calib", str(short), "--out", out, "--quiet"],
           "calibration", "not more than one window")
    _fails(capsys, ["quantize", str(tiny_llama), "--max-windows", "2", *SMALL], "--max-windows applies only with --ppl")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("argv, flag", [
    (["--method", "rtn", "--saliency", "bogus"], "--saliency"),
    (["--method", "rtn", "--saliency", "fisher"], "--saliency"),
    (["--method", "hqq", "--outlier-scope", "global"], "--outlier-scope"),
    (["--method", "rtn", "--grid", "hqq"], "--grid"),
    (["--method", "hqq", "--calib", "wikitext2"], "--calib"),
    (["--budget", "3.5", "--bits", "3"], "--bits"),
    (["--budget", "3.5", "--method", "gwq"], "--method"),
])
def test_flags_that_do_not_apply_are_named(tiny_llama, tmp_path, capsys, argv, flag):
    _fails(capsys, ["quantize", str(tiny_llama), *argv, "--out", str(tmp_path / "q"), "--quiet"], flag)
    assert not (tmp_path / "q").exists()


def test_eval_flags_that_need_tasks(tiny_llama, capsys):
    _fails(capsys, ["eval", str(tiny_llama), "--limit", "3", "--quiet"], "--limit applies only with --tasks")


def test_requantizing_a_checkpoint_is_refused(tiny_llama, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama), "--out", str(ckpt), *SMALL]) == 0
    capsys.readouterr()
    _fails(capsys, ["quantize", str(ckpt), "--method", "rtn", "--out", str(tmp_path / "again"), "--quiet"],
           "already a sensiquant checkpoint")


def test_unexpected_failures_are_one_line_and_debug_shows_the_traceback(tiny_llama, tmp_path, capsys, monkeypatch):
    import sensiquant.cli.commands as commands

    def boom(args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setitem(commands.COMMANDS, "quantize", boom)
    line = _fails(capsys, ["quantize", str(tiny_llama), "--quiet"], "RuntimeError: kernel exploded second line",
                  "--debug")
    assert "Traceback" not in line
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(["quantize", str(tiny_llama), "--quiet", "--debug"])


def test_perplexity_overflow_is_inf_not_a_crash():
    from sensiquant.eval.perplexity import perplexity_of_windows

    class Loud(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, ids):
            logits = torch.full((1, ids.shape[1], 4), -1e4)
            logits[..., 0] = 1e4  # every next token but token 0 is impossible
            return type("Out", (), {"logits": logits})()

    result = perplexity_of_windows(Loud(), torch.tensor([[1, 2, 3, 1]]), progress=False)
    assert result.ppl == float("inf") and result.nll > 700


def test_version_and_every_flag_has_help(capsys):
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("sensiquant ")
    parser = build_parser()
    missing = []
    for sub in parser._subparsers._group_actions[0].choices.values():  # each command's parser
        for action in sub._actions:
            if action.option_strings and action.dest != "help" and not action.help:
                missing.append(f"{sub.prog} {action.option_strings[0]}")
    assert missing == []


def _corrupt(ckpt: Path, how: str) -> None:
    weights, manifest = ckpt / "model.safetensors", ckpt / "sensiquant.json"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "huge-header":
        weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    elif how == "offsets":
        header_len = int.from_bytes(data[:8], "little")
        header = data[8:8 + header_len].decode().replace('"data_offsets":[0,', '"data_offsets":[999999999,', 1)
        weights.write_bytes(len(header).to_bytes(8, "little") + header.encode() + data[8 + header_len:])
    elif how == "manifest-json":
        manifest.write_text(manifest.read_text()[:-20])
    elif how == "bits-4-to-2":
        manifest.write_text(manifest.read_text().replace('"bits": 4', '"bits": 2'))
    elif how == "no-config":
        (ckpt / "config.json").unlink()
    elif how == "no-manifest":
        manifest.unlink()


@pytest.mark.parametrize("how", ["truncated", "empty", "huge-header", "offsets", "manifest-json", "bits-4-to-2",
                                 "no-config", "no-manifest"])
def test_damaged_checkpoints_end_in_one_error_line(tiny_llama, tmp_path, capsys, how):
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama), "--out", str(ckpt), *SMALL]) == 0
    capsys.readouterr()
    _corrupt(ckpt, how)
    _fails(capsys, ["eval", str(ckpt), "--quiet"])


def test_flipped_tensor_bytes_are_caught_by_verify(tiny_llama, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama), "--out", str(ckpt), *SMALL]) == 0
    assert main(["verify", str(ckpt), "--quiet"]) == 0
    capsys.readouterr()
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x10  # a byte of tensor data: the structure stays valid
    weights.write_bytes(bytes(data))
    _fails(capsys, ["verify", str(ckpt), "--quiet"], "sha256")
