"""Plots render real PNGs from a hand-made plan, and refuse to plot nothing."""

from __future__ import annotations

import pytest

from sensiquant import SensiquantError
from sensiquant.planning import Plan, PlanLayer
from sensiquant.plots import plot_allocation, plot_ppl_vs_bits, plot_profiles

MODULES = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _plan() -> Plan:
    layers = [PlanLayer(name=f"model.layers.{b}.{m}", shape=(64, 64), config="b3g64" if b != 1 else "b4g64",
                        bits=64 * 64 * 3 + 200, block=b, module=m, part=m, allocated="b3g64",
                        outlier_ratio=0.01 if m == "mlp.down_proj" else 0.0)
              for b in range(3) for m in MODULES]
    layers.append(PlanLayer(name="lm_head", shape=(64, 256), config="b8g64", bits=64 * 256 * 8, module="lm_head",
                            part="lm_head", allocated="b8g64"))
    profiles = {"sensitivity": {m: [1e-3, 5e-3, 1.1e-3] for m in MODULES}, "kurtosis": {m: [3.0, 9.0, 3.2]
                                                                                       for m in MODULES}}
    flagged = [{"block": 1, "part": "mlp.up_proj", "zscore": 4.2, "score": "sensitivity"},
               {"block": 1, "part": "mlp.down_proj", "zscore": 3.1, "score": "sensitivity"},
               {"block": 1, "part": "self_attn.q_proj", "zscore": 3.5, "score": "kurtosis"}]
    return Plan(method="sensiboost", budget_bits_per_param=3.3, layers=layers, exact=True, profiles=profiles,
                flagged=flagged)


def _is_png(path):
    data = path.read_bytes()
    return data[:4] == b"\x89PNG" and len(data) > 1000


def test_profiles_and_allocation_plots(tmp_path):
    plan = _plan()
    assert _is_png(plot_profiles(plan, tmp_path / "a" / "scores.png"))
    assert _is_png(plot_allocation(plan, tmp_path / "alloc.png"))
    plan.profiles = {"kurtosis": plan.profiles["kurtosis"]}  # one panel only; sensitivity flags are ignored
    assert _is_png(plot_profiles(plan, tmp_path / "kurt.png"))
    for empty in ({}, {"sensitivity": {}}, {"sensitivity": {"attn.qkv": []}}):
        plan.profiles = empty
        with pytest.raises(SensiquantError, match="no score profiles"):
            plot_profiles(plan, tmp_path / "none.png")


def test_ppl_vs_bits(tmp_path):
    rows = [{"method": "uniform", "bits_per_param": b, "ppl_wikitext2": p} for b, p in ((3.1, 90.0), (4.1, 25.0))]
    rows += [{"method": "mxq", "bits_per_param": 3.2, "ppl_wikitext2": 70.0}, {"method": "mxq", "bits_per_param": 3.5},
             {"method": "mxq", "bits_per_param": 2.1, "ppl_wikitext2": float("nan")}]
    assert _is_png(plot_ppl_vs_bits(rows, tmp_path / "ppl.png"))
    with pytest.raises(SensiquantError, match="no row"):
        plot_ppl_vs_bits(rows, tmp_path / "c4.png", metric="ppl_c4")
    with pytest.raises(SensiquantError, match="no row"):
        plot_ppl_vs_bits([{"method": "mxq", "bits_per_param": 3.0, "ppl_wikitext2": float("inf")}], tmp_path / "x.png")
