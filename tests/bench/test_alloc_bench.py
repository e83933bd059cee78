import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_alloc_bench_plans_and_measures_another_model(tiny_llama, data_dir, tmp_path):
    """--model gets its own plans folder and results; --budgets / --variants pick the rows; 'budget default' is the
    plan of `quantize --budget` (no 2-bit rungs where 3-bit ones meet the budget, applied with GPTQ)."""
    out = tmp_path / "alloc.json"
    env = {**os.environ, "SENSIQUANT_DATA_DIR": str(data_dir)}
    common = ["--model", str(tiny_llama), "--budgets", "b3g64", "--variants", "uniform,budget default",
              "--max-windows", "1", "--seqlen", "64", "--out", str(out)]
    for stage in ("plans", "eval"):
        proc = subprocess.run([sys.executable, "-m", "bench.alloc", "--stage", stage, *common], capture_output=True,
                              text=True, timeout=900, cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
    plans = sorted(p.name for p in (tmp_path / f"alloc_plans_{tiny_llama.name}").iterdir())
    assert plans == ["b3g64-budget_default.json", "b3g64-uniform.json"]
    data = json.loads(out.read_text())
    assert data["model"] == str(tiny_llama)
    rows = {r["spec"]["variant"]: r for r in data["rows"]}
    assert set(rows) == {"uniform", "budget default"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["bits_per_param"] <= row["budget"] + 1e-9 and row["ppl_wikitext2"] > 1
    from sensiquant.planning import Plan

    plan = Plan.load(tmp_path / f"alloc_plans_{tiny_llama.name}" / "b3g64-budget_default.json")
    assert plan.apply_method == "gptq" and plan.settings["min_rung_bits"] == 3 and plan.exact
    bad = subprocess.run([sys.executable, "-m", "bench.alloc", "--budgets", "b9g1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert bad.returncode == 2 and "unknown budgets or variants: b9g1" in bad.stderr
