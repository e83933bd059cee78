import pytest
import torch
from torch import nn

from sensiquant.calib.inputs import accumulate_hessian
from sensiquant.errors import SensiquantError
from sensiquant.format.spec import LayerSpec
from sensiquant.methods.gptq import GPTQConfig
from sensiquant.methods.round import RoundConfig, quantize_weight
from sensiquant.methods.signround import (
    SignRoundConfig,
    TunableWeight,
    TunedLinear,
    sign_round,
    start_point,
)

SPECS = [LayerSpec(grid="rtn", bits=3, group_size=16), LayerSpec(grid="hqq", bits=2, group_size=24, quant_meta=True,
                                                                   meta_group_size=8)]


def _block(seed: int = 0):
    """A seeded two-layer MLP block and calibration batches: targets are the full-precision outputs."""
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(48, 40, generator=gen) / 6
    w2 = torch.randn(40, 48, generator=gen) / 7
    xs = [torch.randn(64, 40, generator=gen) * (1 + torch.arange(40) / 10) for _ in range(4)]
    targets = [torch.relu(x @ w1.T) @ w2.T for x in xs]
    return w1, w2, xs, targets


def _tunables(w1, w2, xs, spec, method, mask1=None):
    h1 = None
    if isinstance(method, GPTQConfig):
        h1, n = None, 0
        for x in xs:
            h1, n = accumulate_hessian(h1, x, n)
    t1 = TunableWeight(start_point(w1, spec, method, h1, mask1), spec)
    h2 = None
    if isinstance(method, GPTQConfig):
        h2, n = None, 0
        for x in xs:
            h2, n = accumulate_hessian(h2, torch.relu(x @ w1.T), n)
    t2 = TunableWeight(start_point(w2, spec, method, h2), spec)
    l1, l2 = TunedLinear(t1, None), TunedLinear(t2, None)
    return [t1, t2], (lambda i: l2(torch.relu(l1(xs[i]))))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", [RoundConfig(), GPTQConfig(act_order=False)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuning_never_ends_above_its_start(spec, method, seed):
    w1, w2, xs, targets = _block(seed)
    tunables, run = _tunables(w1, w2, xs, spec, method)
    result = sign_round(tunables, run, targets, SignRoundConfig(iters=30, lr=0.02, seed=seed))
    kept = result.loss_start if result.kept == "start" else result.loss_end
    assert kept <= result.loss_start and result.kept in ("start", "tuned", "best step")
    with torch.no_grad():
        final = sum(float(nn.functional.mse_loss(run(i), t)) for i, t in enumerate(targets)) / len(targets)
    assert final == pytest.approx(kept, rel=1e-5)


def test_tuning_lowers_the_block_error_from_round_to_nearest():
    w1, w2, xs, targets = _block(3)
    tunables, run = _tunables(w1, w2, xs, SPECS[0], RoundConfig())
    result = sign_round(tunables, run, targets, SignRoundConfig(iters=60, lr=0.02))
    assert result.kept != "start" and result.loss_end < 0.9 * result.loss_start


def test_an_overshooting_run_keeps_its_best_step():
    """Large steps late in the run overshoot: the best step's parameters come back, not the last ones."""
    w1, w2, xs, targets = _block(0)
    seen = []
    for lr in (0.05, 0.3):
        tunables, run = _tunables(w1, w2, xs, SPECS[0], RoundConfig())
        result = sign_round(tunables, run, targets, SignRoundConfig(iters=30, lr=lr, scale_range=0.9))
        with torch.no_grad():
            final = sum(float(nn.functional.mse_loss(run(i), t)) for i, t in enumerate(targets)) / len(targets)
        assert final == pytest.approx(result.loss_start if result.kept == "start" else result.loss_end, rel=1e-5)
        seen.append(result.kept)
    assert seen == ["best step"] * 2  # seed 0: both end above one of their steps


def test_a_kept_start_restores_the_start_exactly():
    w1, w2, xs, targets = _block(4)
    tunables, run = _tunables(w1, w2, xs, SPECS[0], RoundConfig())
    before = [t.weight().detach().clone() for t in tunables]
    # a huge step overshoots: the tuned point is worse, and the start must come back bit for bit
    result = sign_round(tunables, run, targets, SignRoundConfig(iters=3, lr=0.9, scale_range=0.9))
    if result.kept == "start":
        assert all(torch.equal(b, t.weight()) for b, t in zip(before, tunables))
    assert min(result.loss_start, result.loss_end) <= result.loss_start


@pytest.mark.parametrize("spec", SPECS)
def test_start_at_zero_offsets_is_round_to_nearest(spec):
    w = _block(5)[0]
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[3, 7] = mask[10, 0] = True
    tuned = TunableWeight(start_point(w, spec, RoundConfig(), None, mask), spec).finalize()
    plain = quantize_weight(w, spec, mask)
    assert torch.equal(tuned.codes, plain.codes)
    assert torch.equal(tuned.dequantize(), plain.dequantize())


@pytest.mark.parametrize("spec", SPECS + [SPECS[1].replace(outlier_format="block", outlier_ratio=0.01)])
def test_the_stored_weight_is_the_tuned_weight(spec):
    w1, w2, xs, targets = _block(6)
    mask = torch.rand(w1.shape, generator=torch.Generator().manual_seed(0)) < 0.02
    tunables, run = _tunables(w1, w2, xs, spec, RoundConfig(), mask)
    sign_round(tunables, run, targets, SignRoundConfig(iters=10, lr=0.05))
    for t in tunables:
        stored = t.finalize().dequantize()
        tuned = t.weight().detach()
        if spec.outlier_format == "block" and t.mask is not None:
            bound = float(t.finalize().outliers.scale.float()) / 2 + 1e-7
            assert float((stored - tuned).abs().max()) <= bound
        else:  # FP16 outliers: exact up to their storage rounding
            assert torch.allclose(stored, tuned, atol=1e-6, rtol=1e-3)
            dense = torch.ones_like(tuned, dtype=torch.bool) if t.mask is None else ~t.mask
            assert torch.allclose(stored[dense], tuned[dense], atol=1e-6, rtol=0)
    assert tunables[0].finalize().outliers is not None


@pytest.mark.parametrize("bad", [{"iters": -1}, {"lr": 0}, {"seqlen": 0}, {"batch_size": 1.5},
                                 {"scale_range": 1.0}])
def test_bad_settings_are_one_clear_error(bad):
    with pytest.raises(SensiquantError):
        SignRoundConfig(**bad)


def test_config_round_trips_through_json():
    config = SignRoundConfig(iters=7, lr=0.01, tune_scale=False)
    assert SignRoundConfig.from_json(config.to_json()) == config
