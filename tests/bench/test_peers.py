import json
import subprocess

from harness import run_peers


def test_peer_harness_runs_end_to_end_on_a_tiny_model(tiny_llama, data_dir, tmp_path):
    cmd, out = run_peers(tiny_llama, "sensiquant", "hqq-b4g64,gwq", data_dir, tmp_path, "--zeroshot-limit", "2")
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["hqq-b4g64", "gwq"]
    for row in rows:
        assert "error" not in row, row
        assert row["ppl_wikitext2"] > 1 and row["ppl_c4"] > 1 and row["quantized_params"] > 0
        tasks = row["zeroshot"]["tasks"]
        assert len(tasks) == 8 and all(len(t["per_example"]) == t["n"] <= 2 for t in tasks.values())
    bits = {r["setting"]: r["bits_per_param"] for r in rows}
    assert 3.3 < bits["gwq"] < bits["hqq-b4g64"]  # 3-bit g64 meta8 + 0.99% outliers vs 4-bit g64 fp16 meta
    assert (tmp_path / "peers-wikitext2.png").read_bytes()[:4] == b"\x89PNG"
    # a second run resumes: nothing is run again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and json.loads(out.read_text())["rows"] == rows


def test_budget_setting_plans_within_its_budget(tiny_llama, data_dir, tmp_path):
    _, out = run_peers(tiny_llama, "sensiquant", "budget-3.60", data_dir, tmp_path)
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row
    # the plan spends the budget (to a rounding of the integer program) and never more
    assert 3.4 < row["bits_per_param"] <= 3.60 and row["ppl_wikitext2"] > 1


def test_rows_without_the_asked_zero_shot_run_again():
    from bench.peers import done_rows

    rows = [{"peer": "a", "setting": "x"}, {"peer": "a", "setting": "y", "zeroshot": {"limit": 10, "tasks": {}}},
            {"peer": "b", "setting": "z", "zeroshot": {"limit": 10, "skipped": "no transformers model"}},
            {"peer": "b", "setting": "w", "error": "boom"}]
    assert done_rows(rows, 0) == {("a", "x"), ("a", "y"), ("b", "z")}
    assert done_rows(rows, 10) == {("a", "y"), ("b", "z")}
    assert done_rows(rows, 20) == set()


def test_pareto_front():
    from sensiquant.plots import pareto_front

    points = [(4.5, 24.0), (3.3, 60.0), (3.6, 28.0), (4.1, 30.0), (3.6, 27.0)]
    assert pareto_front(points) == [(3.3, 60.0), (3.6, 27.0), (4.5, 24.0)]


def test_autoround_bits_count_its_packed_export():
    """Codes at their width, one FP16 scale and one packed zero per group; a ragged last group counts whole."""
    from bench.peers_calib import _export_bits

    assert _export_bits(16, 576, 3, 128) == 16 * 576 * 3 + 16 * 5 * (16 + 3)  # 576 = 4 x 128 + 64: 5 groups
    assert _export_bits(8, 256, 4, 128) / (8 * 256) == 4 + 20 / 128


def test_unknown_settings_are_refused_in_one_line(monkeypatch, tmp_path):
    """A setting no chosen peer knows (a typo, or a variant of another peer) stops the run before any row."""
    import sys

    import pytest

    from bench import peers

    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["peers", "--peers", "sensiquant", "--settings", "gwq,IQ4_NL+pure",
                                      "--out", str(out)])
    with pytest.raises(SystemExit, match=r"unknown settings \['IQ4_NL\+pure'\] for peers sensiquant"):
        peers.main()
    assert not out.exists()


def test_llamacpp_pure_variants_run_only_when_named():
    from bench.peers_llamacpp import PEERS

    (peer,) = PEERS
    assert "IQ4_NL+imatrix+pure" in peer.optional and not any(s.endswith("+pure") for s in peer.settings)
