"""Plans on tiny random models: every method, the budget rules, JSON round trip, apply + save + reload, the CLI."""

import json

import numpy as np
import pytest
import torch

from sensiquant import CalibConfig, SensiquantError, load_quantized
from sensiquant.cli import main
from sensiquant.planning import LadderConfig, Plan, PlanConfig, apply_plan, make_plan
from sensiquant.planning.scoring import layer_sites

LADDER = ["b2g64", "b3g64", "b4g64", "b8g64"]  # a short ladder keeps the error table cheap


def _model(n_layers: int, plant: int | None = None):
    from bench.tiny_model import make_tiny_llama

    model = make_tiny_llama(n_layers, hidden_size=64, intermediate_size=128, tied=False)
    if plant is not None:
        with torch.no_grad():  # a few huge weights: heavy tails in one q_proj
            model.model.layers[plant].self_attn.q_proj.weight[0, :4] = 1.5
    return model


def _config(method, budget=3.5, **kw):
    calib = CalibConfig(source="text", samples=2, seqlen=64)
    return PlanConfig(method=method, budget=budget, ladder=tuple(LADDER), **{"sensitivity_calib": calib,
                                                                              "gradient_calib": calib, **kw})


@pytest.fixture(scope="module")
def tok():
    from bench.tiny_model import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(autouse=True)
def _text(monkeypatch, text_file):
    import sensiquant.planning.planner as planning

    real = planning.calibration_windows
    monkeypatch.setattr(planning, "calibration_windows",
                        lambda tok, calib: real(tok, calib.replace(source=str(text_file))))


def test_sites_group_block_parts():
    sites = layer_sites(["model.layers.3.self_attn.k_proj", "model.layers.3.mlp.up_proj",
                         "model.layers.3.mlp.down_proj", "model.layers.3.self_attn.o_proj", "lm_head"])
    assert sites["model.layers.3.self_attn.k_proj"].part == "attn.qkv"
    assert sites["model.layers.3.self_attn.k_proj"].block == 3
    assert sites["model.layers.3.mlp.up_proj"].part == "mlp.gate_up"
    assert sites["model.layers.3.mlp.down_proj"].part == "mlp.down"
    assert sites["model.layers.3.self_attn.o_proj"].part == "attn.o"
    assert sites["lm_head"].block is None
    two = layer_sites(["visual.blocks.0.attn.qkv", "model.layers.0.self_attn.q_proj"])
    assert two["visual.blocks.0.attn.qkv"].part != two["model.layers.0.self_attn.q_proj"].part


def test_uniform_picks_the_largest_rung_that_fits(tok):
    model = _model(2)
    plan = make_plan(model, tok, _config("uniform", 3.5), progress=False)
    assert {layer.config for layer in plan.layers} == {"b3g64"}
    assert plan.bits_per_param <= 3.5
    with pytest.raises(SensiquantError, match="no single rung"):
        make_plan(model, tok, _config("uniform", 2.1), progress=False)


@pytest.mark.parametrize("budget", [2.9, 3.5, 4.4])
def test_mxq_meets_the_budget_and_beats_uniform_error(tok, budget):
    model = _model(2)
    mxq = make_plan(model, tok, _config("mxq", budget), progress=False)
    assert mxq.total_bits <= budget * mxq.total_params
    assert len({layer.config for layer in mxq.layers}) >= 2  # budgets between rungs need a mix
    # each layer's recorded bits are the exact accounting of its config
    from sensiquant.format import storage_bits

    for layer in mxq.layers:
        assert layer.bits == storage_bits(layer.shape, layer.spec())


def test_kurtboost_flags_the_planted_layer_and_exact_mode_pays_for_it(tok):
    model = _model(24, plant=13)
    paper = make_plan(model, tok, _config("kurtboost", 3.3), progress=False)
    assert [(f["block"], f["part"]) for f in paper.flagged] == [(13, "self_attn.q_proj")]
    boosted = paper.layer("model.layers.13.self_attn.q_proj")
    rungs = [LadderConfig.from_name(n) for n in LADDER]
    assert rungs.index(LadderConfig.from_name(boosted.config)) == min(
        rungs.index(LadderConfig.from_name(boosted.allocated)) + 2, len(rungs) - 1)
    assert "kurtosis jump at block 13" in boosted.reason
    exact = make_plan(model, tok, _config("kurtboost", 3.3, exact=True), progress=False)
    assert exact.total_bits <= 3.3 * exact.total_params
    assert exact.layer("model.layers.13.self_attn.q_proj").config == boosted.config
    assert paper.total_bits >= exact.total_bits
    flat = make_plan(_model(24), tok, _config("kurtboost", 3.3), progress=False)
    assert flat.flagged == []


def test_sensiboost_profiles_and_plan_json_round_trip(tok, tmp_path):
    model = _model(3)
    plan = make_plan(model, tok, _config("sensiboost", 3.3, exact=True), progress=False)
    profile = plan.profiles["sensitivity"]
    assert set(profile) == {"attn.qkv", "attn.o", "mlp.gate_up", "mlp.down"}
    assert all(len(v) == 3 and all(x > 0 for x in v) for v in profile.values())
    assert all("sensitivity" in layer.scores for layer in plan.layers)
    path = plan.save(tmp_path / "plan.json")
    again = Plan.load(path)
    assert again.to_dict() == plan.to_dict()
    assert json.loads(path.read_text())["format"] == "sensiquant-plan/2"
    with pytest.raises(SensiquantError, match="not a sensiquant plan"):
        Plan.from_dict({"method": "mxq"})


def test_exact_mode_with_gwq_outliers_counts_them_in_the_budget(tok, tmp_path):
    model = _model(2)
    config = _config("mxq", 3.6, exact=True, outlier_ratios=(0.0, 0.01))
    plan = make_plan(model, tok, config, progress=False)
    assert plan.total_bits <= 3.6 * plan.total_params
    report, quant_config = apply_plan(model, tok, plan, progress=False)
    assert report.quantized_bits == plan.total_bits  # outliers included, to the bit
    assert report.n_outliers == sum(round(layer.outlier_ratio * layer.numel) for layer in plan.layers)


def test_block_outliers_in_plans_cost_less_and_are_stored_as_planned(tok, text_file):
    """The same options cost less as block residuals than as FP16 CSR, so an exact plan at the same budget affords
    more outliers or higher rungs; applying it stores block outliers, to the bit of the plan."""
    csr_plan = make_plan(_model(2), tok, _config("mxq", 3.6, exact=True, outlier_ratios=(0.0, 0.02)), progress=False)
    model = _model(2, plant=1)  # heavy-tailed weights, where outliers pay
    config = _config("mxq", 3.6, exact=True, outlier_ratios=(0.0, 0.02), outlier_format="block",
                     gradient_calib=CalibConfig(source=str(text_file), samples=2, seqlen=64))
    plan = make_plan(model, tok, config, progress=False)
    assert plan.outlier_format == "block" and plan.total_bits <= 3.6 * plan.total_params
    spec = LadderConfig.from_name("b3g64").spec("hqq", 0.02, "block")
    assert spec.outlier_format == "block"
    from sensiquant.format import storage_bits

    shape = plan.layers[0].shape
    assert storage_bits(shape, spec) < storage_bits(shape, spec.replace(outlier_format="csr"))
    first = plan.layers[0]  # tiny matrices rarely buy outliers: give one layer a share, at its exact cost
    first.config, first.outlier_ratio = "b3g64", 0.02
    first.bits = storage_bits(first.shape, spec)
    report, quant_config = apply_plan(model, tok, plan, progress=False)
    assert all(s.outlier_format == "block" for s in quant_config.overrides.values())
    assert report.quantized_bits == plan.total_bits
    assert report.layers[first.name].n_outliers == round(0.02 * first.numel)
    # the JSON keeps the format; a plan written before it existed reads as CSR
    assert Plan.from_json(plan.to_json()).outlier_format == "block"
    old = plan.to_dict()
    old.pop("outlier_format")
    assert Plan.from_dict(old).outlier_format == "csr"
    assert csr_plan.outlier_format == "csr"
    with pytest.raises(SensiquantError, match="outlier format"):
        PlanConfig(outlier_format="coo")


def test_a_plan_applies_with_block_tuning(tok, tiny_llama, text_file, tmp_path):
    from sensiquant.io import load_model

    model, tok2 = load_model(str(tiny_llama))
    config = _config("mxq", 3.6, exact=True, outlier_ratios=(0.0, 0.02), outlier_format="block",
                     gradient_calib=CalibConfig(source=str(text_file), samples=2, seqlen=64))
    plan_path = make_plan(model, tok2, config, progress=False).save(tmp_path / "plan.json")
    out = tmp_path / "ckpt"
    assert main(["quantize", str(tiny_llama), "--plan", str(plan_path), "--tune", "--tune-iters", "2", "--out",
                 str(out), "--quiet"]) == 0
    manifest = json.loads((out / "sensiquant.json").read_text())
    assert manifest["config"]["tuning"]["iters"] == 2
    assert load_quantized(out)[0] is not None
    assert main(["plan", str(tiny_llama), "--budget", "3.6", "--method", "mxq", "--ladder", ",".join(LADDER),
                 "--outlier-format", "block", "--out", str(tmp_path / "p2.json"), "--quiet"]) == 0
    assert Plan.load(tmp_path / "p2.json").outlier_format == "block"


def test_apply_save_reload_runs(tok, tiny_llama, tmp_path):
    from sensiquant import quantize_with_plan

    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(tiny_llama), "--budget", "3.4", "--method", "mxq", "--ladder", ",".join(LADDER),
                 "--out", str(plan_path), "--quiet", "--plots", str(tmp_path / "plots")]) == 0
    plan = Plan.load(plan_path)
    assert (tmp_path / "plots" / "allocation.png").is_file()
    model, tok2, report, _ = quantize_with_plan(str(tiny_llama), plan, tmp_path / "ckpt", progress=False)
    assert report.quantized_bits == plan.total_bits
    assert (tmp_path / "ckpt" / "plan.json").is_file()
    ids = torch.randint(0, 256, (1, 32))
    reloaded, _ = load_quantized(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert main(["quantize", str(tiny_llama), "--plan", str(plan_path), "--quiet"]) == 0


def test_bad_input_gives_clear_errors(capsys, tmp_path, tiny_llama):
    with pytest.raises(SensiquantError, match="unknown plan method"):
        PlanConfig(method="magic")
    with pytest.raises(SensiquantError, match="budget-exact"):
        PlanConfig(method="mxq", outlier_ratios=(0, 0.01))
    with pytest.raises(SensiquantError, match="bad ladder config"):
        PlanConfig(ladder=("q4",))
    assert main(["quantize", str(tiny_llama), "--plan", str(tmp_path / "missing.json"), "--quiet"]) == 2
    assert "plan file not found" in capsys.readouterr().err


def test_row_sampled_error_table_estimates_the_whole_matrix():
    """A seeded row sample, scaled to the matrix, estimates the error table; all rows give the exact table."""
    from sensiquant.planning.scoring import option_errors, sample_rows

    assert sample_rows(64, None, 0) is None and sample_rows(64, 64, 0) is None
    rows = sample_rows(256, 32, 3)
    assert rows.tolist() == sorted(set(rows.tolist())) and len(rows) == 32
    assert torch.equal(rows, sample_rows(256, 32, 3)) and not torch.equal(rows, sample_rows(256, 32, 4))
    torch.manual_seed(0)
    layers = {f"l{i}": torch.nn.Linear(256, 512, bias=False) for i in range(3)}
    importance = {n: torch.rand(512, 256) for n in layers}
    saliency = {n: torch.rand(512, 256) for n in layers}
    options = [(LadderConfig.from_name(n), r) for n in ("b2g64", "b3g64", "b4g64") for r in (0.0, 0.01)]
    grad_abs = {n: torch.rand(512, 256) for n in layers}
    full = option_errors(layers, options, "hqq", saliency, importance, progress=False, grad_abs=grad_abs)
    same = option_errors(layers, options, "hqq", saliency, importance, progress=False, rows=512, grad_abs=grad_abs)
    sampled = option_errors(layers, options, "hqq", saliency, importance, progress=False, rows=128,
                            grad_abs=grad_abs)
    for metric in ("frobenius", "fisher", "abs_grad"):
        assert np.array_equal(full[metric], same[metric])
        assert not np.array_equal(full[metric], sampled[metric])
        assert np.allclose(sampled[metric], full[metric], rtol=0.05)
        # the ranking of the options of one layer is what the allocation reads: kept here
        assert (np.argsort(sampled[metric], axis=1) == np.argsort(full[metric], axis=1)).all()


def test_abs_grad_metric_is_autoschemes_weight_score(tok):
    """sum |g| * |W - Q(W)| on a bare matrix, and a plan scored by it meets its budget."""
    from sensiquant.methods.round import quantize_weight
    from sensiquant.planning.scoring import option_errors

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64, bias=False)
    g_abs = torch.rand(64, 128)
    config = LadderConfig.from_name("b3g64")
    table = option_errors({"l": layer}, [(config, 0.0)], "hqq", progress=False, grad_abs={"l": g_abs})
    w = layer.weight.detach()
    q = quantize_weight(w, config.spec("hqq").fitted(128)).dequantize()
    assert table["abs_grad"][0, 0] == pytest.approx(float(((w - q).abs() * g_abs).sum()), rel=1e-5)
    plan = make_plan(_model(2), tok, _config("mxq", 3.5, error_metric="abs_grad"), progress=False)
    assert plan.total_bits <= 3.5 * plan.total_params
    assert all("error_abs_grad" in layer.scores for layer in plan.layers)
    with pytest.raises(SensiquantError, match="error metric"):
        PlanConfig(error_metric="l1")


def test_output_metric_is_kfac_fisher_of_the_apply_methods_codes(tok):
    """With a diagonal Hessian and a rank-one Fisher (F_ij = G_i H_jj / 2) the output metric of rounded codes is
    the diagonal Fisher metric; on correlated inputs GPTQ's codes score lower than rounding's; a plan scored by
    it (applied with GPTQ) meets its budget."""
    from sensiquant.methods.gptq import GPTQConfig
    from sensiquant.planning.scoring import option_errors, option_output_errors

    torch.manual_seed(0)
    layer = torch.nn.Linear(128, 64, bias=False)
    options = [(LadderConfig.from_name(n), 0.0) for n in ("b3g64", "b4g32")]
    h_diag = torch.diag(torch.rand(128) + 0.5)
    fisher = (torch.rand(64) + 0.1)[:, None] * torch.diagonal(h_diag)[None, :] / 2
    out = option_output_errors({"l": layer}, options, "hqq", {"l": h_diag}, {"l": fisher}, progress=False)
    diag = option_errors({"l": layer}, options, "hqq", weight_importance={"l": fisher}, progress=False)["fisher"]
    assert np.allclose(out, diag, rtol=1e-4)

    x = torch.randn(512, 128) @ (torch.randn(128, 128) / 128**0.5)
    h = 2 / 512 * x.t() @ x
    rounded = option_output_errors({"l": layer}, options, "hqq", {"l": h}, {"l": fisher}, progress=False)
    solved = option_output_errors({"l": layer}, options, "hqq", {"l": h}, {"l": fisher}, gptq=GPTQConfig(),
                                  progress=False)
    assert (solved < rounded).all()

    config = _config("mxq", 3.5, error_metric="output", apply_method="gptq")
    plan = make_plan(_model(2), tok, config, progress=False)
    assert plan.total_bits <= 3.5 * plan.total_params
    assert all(layer.scores["error_output"] > 0 for layer in plan.layers)
    assert "inputs" in plan.seconds


def test_loss_objective_minimises_the_summed_squares(tok):
    """objective="loss" sums squared errors (the second-order loss estimate): its plan has the lowest sum of squares
    of any plan within the budget, the root plan's included; "root" has the lowest sum of roots. Older plan
    settings (version 4) read back as root."""
    from sensiquant.planning import PlanCache

    model, cache = _model(2), PlanCache()
    plans = {o: make_plan(model, tok, _config("mxq", 3.4, exact=True, error_metric="fisher", objective=o),
                          progress=False, cache=cache) for o in ("root", "loss")}
    errors = {o: np.array([layer.scores["error_fisher"] for layer in p.layers]) for o, p in plans.items()}
    for plan in plans.values():
        assert plan.total_bits <= 3.4 * plan.total_params
    assert (errors["loss"] ** 2).sum() <= (errors["root"] ** 2).sum() * (1 + 1e-9)
    assert errors["root"].sum() <= errors["loss"].sum() * (1 + 1e-9)
    with pytest.raises(SensiquantError, match="objective"):
        PlanConfig(objective="mean")
    old = {k: v for k, v in PlanConfig().to_dict().items() if k != "objective"}
    assert PlanConfig.from_dict({**old, "version": 4}).objective == "root"


def test_error_rows_plan_and_cli(tok, tmp_path, tiny_llama):
    plan = make_plan(_model(2), tok, _config("mxq", 3.5, error_rows=8), progress=False)
    assert plan.total_bits <= 3.5 * plan.total_params
    assert PlanConfig.from_dict(plan.settings).error_rows == 8
    for bad in (0, -1, 2.5, True):
        with pytest.raises(SensiquantError, match="error rows"):
            PlanConfig(error_rows=bad)
    assert main(["plan", str(tiny_llama), "--budget", "3.4", "--method", "mxq", "--ladder", ",".join(LADDER),
                 "--error-rows", "16", "--out", str(tmp_path / "p.json"), "--quiet"]) == 0
    assert Plan.load(tmp_path / "p.json").settings["error_rows"] == 16
    assert main(["plan", str(tiny_llama), "--budget", "3.4", "--error-rows", "-2", "--out",
                 str(tmp_path / "q.json"), "--quiet"]) == 2
    assert main(["plan", str(tiny_llama), "--budget", "3.4", "--method", "mxq", "--ladder", ",".join(LADDER),
                 "--error-rows", "0", "--error-fit", "full", "--out", str(tmp_path / "f.json"), "--quiet"]) == 0
    settings = Plan.load(tmp_path / "f.json").settings
    assert settings["error_rows"] is None and settings["error_fit"] == "full"
    with pytest.raises(SensiquantError, match="error fit"):
        PlanConfig(error_fit="exact")
    # plans made before version 3 measured every row with the full fit: read back as such
    old = {k: v for k, v in PlanConfig().to_dict().items() if k not in ("error_rows", "error_fit")}
    assert PlanConfig.from_dict({**old, "version": 2}).error_rows is None
    assert PlanConfig.from_dict({**old, "version": 2}).error_fit == "full"
    assert PlanConfig.from_dict(PlanConfig().to_dict()) == PlanConfig()


def test_applying_a_plan_reuses_its_gradient_pass(tok, tiny_llama, text_file, monkeypatch):
    """quantize_with_plan makes one gradient pass for the plan and its GWQ outliers, with the same checkpoint."""
    import sensiquant.calib.gradients as gradients_module
    import sensiquant.pipeline.driver as driver
    import sensiquant.planning.planner as planner
    from sensiquant import quantize_with_plan
    from sensiquant.io import load_model

    calls = []
    real = gradients_module.gradient_statistics

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(planner, "gradient_statistics", counted)
    monkeypatch.setattr(driver, "gradient_statistics", counted)
    config = _config("mxq", 3.6, exact=True, outlier_ratios=(0.0, 0.02), outlier_format="block",
                     gradient_calib=CalibConfig(source=str(text_file), samples=2, seqlen=64))
    model, _, report, plan = quantize_with_plan(str(tiny_llama), config, progress=False)
    assert len(calls) == 1 and report.n_outliers > 0
    again, tok2 = load_model(str(tiny_llama))
    apply_plan(again, tok2, plan, progress=False)  # no cache: its own gradient pass, the same result
    assert len(calls) == 2
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_low_rungs_only_when_the_budget_needs_them(tok, tmp_path, tiny_llama):
    model = _model(2)
    roomy = make_plan(model, tok, _config("mxq", 3.5, min_rung_bits=3), progress=False)
    assert all(LadderConfig.from_name(layer.config).bits >= 3 for layer in roomy.layers)
    assert roomy.total_bits <= 3.5 * roomy.total_params
    tight = make_plan(model, tok, _config("mxq", 2.9, min_rung_bits=3), progress=False)  # 3-bit rungs cannot meet it
    assert tight.total_bits <= 2.9 * tight.total_params
    assert any(LadderConfig.from_name(layer.config).bits == 2 for layer in tight.layers)
    for bad in (-1, 2.5, True):
        with pytest.raises(SensiquantError, match="min rung bits"):
            PlanConfig(min_rung_bits=bad)
    # plans made before version 4 used every rung
    old = {k: v for k, v in PlanConfig(min_rung_bits=3).to_dict().items() if k != "min_rung_bits"}
    assert PlanConfig.from_dict({**old, "version": 3}).min_rung_bits == 0
    assert main(["plan", str(tiny_llama), "--budget", "3.4", "--method", "mxq", "--ladder", ",".join(LADDER),
                 "--min-rung-bits", "3", "--out", str(tmp_path / "p.json"), "--quiet"]) == 0
    plan = Plan.load(tmp_path / "p.json")
    assert plan.settings["min_rung_bits"] == 3
    assert all(LadderConfig.from_name(layer.config).bits >= 3 for layer in plan.layers)


def test_quantize_budget_holds_back_2_bit_rungs_unless_the_ladder_is_given(monkeypatch, tiny_llama, tmp_path):
    import sensiquant.api as api

    seen = []

    def fake(model, plan, out, **kw):  # the command's plan config is the point; stop before any work
        seen.append(plan)
        raise SensiquantError("stop")

    monkeypatch.setattr(api, "quantize_with_plan", fake)
    assert main(["quantize", str(tiny_llama), "--budget", "3.4", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert main(["quantize", str(tiny_llama), "--budget", "3.4", "--ladder", ",".join(LADDER),
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert [config.min_rung_bits for config in seen] == [3, 0]


def test_quantize_budget_with_preset_best_tunes_the_plan_from_the_grid(monkeypatch, tiny_llama, tmp_path):
    import sensiquant.api as api
    from sensiquant.pipeline import preset

    seen = []

    def fake(model, plan, out, tuning=None, **kw):  # the job's settings are the point; stop before any work
        seen.append((plan, tuning))
        raise SensiquantError("stop")

    monkeypatch.setattr(api, "quantize_with_plan", fake)
    assert main(["quantize", str(tiny_llama), "--budget", "3.4", "--preset", "best", "--out", str(tmp_path / "a"),
                 "--quiet"]) == 2
    plan, tuning = seen[0]
    assert plan.apply_method == "round" and plan.gradient_calib.samples == preset("best").calib.samples
    assert tuning == preset("best").tuning and plan.min_rung_bits == 3
    assert main(["quantize", str(tiny_llama), "--budget", "3.4", "--preset", "best", "--tune-iters", "7",
                 "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert seen[1][1].iters == 7
    assert main(["quantize", str(tiny_llama), "--budget", "3.4", "--out", str(tmp_path / "c"), "--quiet"]) == 2
    assert seen[2][0].apply_method == "gptq" and seen[2][1] is None
    for bad in (["--budget", "3.4", "--preset", "fast"], ["--plan", str(tmp_path / "p.json"), "--preset", "best"]):
        assert main(["quantize", str(tiny_llama), *bad, "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert len(seen) == 3
