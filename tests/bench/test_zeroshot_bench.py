import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import zeroshot_quantized_table
from sensiquant import api

REPO = Path(__file__).resolve().parents[2]


def _run(model: str, label: str, data_dir, out, *extra: str) -> None:
    cmd = [sys.executable, "-m", "bench.zeroshot", "--model", model, "--label", label, "--tasks", "piqa,winogrande",
           "--limit", "4", "--data-dir", str(data_dir), "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "SENSIQUANT_DATA_DIR": str(data_dir)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_zero_shot_of_a_checkpoint_beside_its_base(tiny_llama, data_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    _, _, report = api.quantize(str(tiny_llama), "hqq", ckpt, progress=False)
    out = tmp_path / "zeroshot_quantized.json"
    _run(str(tiny_llama), "base", data_dir, out)
    _run(str(ckpt), "hqq 4-bit", data_dir, out, "--ppl-windows", "1")
    runs = json.loads(out.read_text())["runs"]
    base, quant = runs["base bfloat16 (fp32 head) limit 4"], runs["hqq 4-bit bfloat16 (fp32 head) limit 4"]
    assert "bits_per_param" not in base and quant["bits_per_param"] == pytest.approx(report.bits_per_param)
    assert all(len(run["tasks"][t]["per_example"]) == 4 for run in (base, quant) for t in ("piqa", "winogrande"))
    table = zeroshot_quantized_table({"runs": runs})
    assert "| base | 32 (base) | - | - |" in table
    assert quant["ppl_windows"] == 1 and quant["ppl_wikitext2"] > 1 and quant["ppl_c4"] > 1
    assert (f"| hqq 4-bit | {report.bits_per_param:.3f} | {quant['ppl_wikitext2']:.2f} | {quant['ppl_c4']:.2f} |"
            in table)
    assert table.count(" pts |") == 1  # only the quantized row has a change against the base


def test_paired_change_against_the_base():
    """The mean's change is the mean over tasks of the per-task paired differences; its standard error adds the
    per-task paired variances."""
    base = {"limit": 4, "tasks": {"a": {"acc": 0.5, "acc_stderr": 0.29, "per_example": [1, 1, 0, 0]},
                                  "b": {"acc": 0.25, "acc_stderr": 0.25, "per_example": [1, 0, 0, 0]}}}
    quant = {"limit": 4, "bits_per_param": 3.5,
             "tasks": {"a": {"acc": 0.5, "acc_stderr": 0.29, "per_example": [1, 0, 1, 0]},
                       "b": {"acc": 0.5, "acc_stderr": 0.29, "per_example": [1, 1, 0, 0]}}}
    table = zeroshot_quantized_table({"runs": {"base": base, "q": quant}})
    # task a: differences 0,-1,+1,0 (mean 0, var 2/3); task b: 0,+1,0,0 (mean 1/4, var 1/4)
    se = ((2 / 3 / 4) + (1 / 4 / 4)) ** 0.5 / 2
    assert f"| q | 3.500 | - | - | 0.500 ± 0.290 | 0.500 ± 0.290 | 0.5000 | +12.50 ± {se * 100:.2f} pts |" in table


def test_peer_rows_scored_with_zero_shot_join_the_table():
    task = {"acc": 0.5, "acc_stderr": 0.29, "per_example": [1, 0, 1, 0]}
    base = {"label": "base", "limit": 4, "tasks": {"a": task}}
    peers = {"max_windows": 8, "rows": [
        {"peer": "spqr", "setting": "w3g32", "bits_per_param": 3.61, "ppl_wikitext2": 30.0, "ppl_c4": 60.0,
         "zeroshot": {"limit": 4, "tasks": {"a": {**task, "per_example": [1, 1, 1, 0], "acc": 0.75}}}},
        {"peer": "llama.cpp", "setting": "Q4_K_M", "bits_per_param": 5.5, "ppl_wikitext2": 20.0, "ppl_c4": 38.0,
         "zeroshot": {"limit": 4, "skipped": "no transformers model"}}]}
    table = zeroshot_quantized_table({"runs": {"base": base}}, peers)
    assert "| spqr w3g32 | 3.610 | 30.00 | 60.00 | 0.750 ± 0.290 | 0.7500 | +25.00 ± 25.00 pts |" in table
    assert "llama.cpp" not in table
    # a model without zero-shot rows yet (the second model's peers file) says so instead of an empty table
    assert zeroshot_quantized_table({"runs": {}}, {"max_windows": 8, "rows": peers["rows"][1:]}) == \
        "No model scored with zero-shot tasks yet."
