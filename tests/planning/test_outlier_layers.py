import numpy as np
import pytest
import torch

from sensiquant.planning import (
    adjacent_changes,
    detect_outlier_layers,
    pearson_kurtosis,
    trimmed_zscores,
)


def _noisy_flat(seed, n=30, level=1.0, noise=0.02):
    rng = np.random.default_rng(seed)
    return level * (1.0 + noise * rng.uniform(-1.0, 1.0, n))


def test_kurtosis_gaussian_and_laplace():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(1_000_000, generator=g)
    assert pearson_kurtosis(gauss) == pytest.approx(3.0, abs=0.05)
    assert pearson_kurtosis(3.0 * gauss.view(1000, 1000) + 5.0) == pytest.approx(3.0, abs=0.05)
    torch.manual_seed(0)
    laplace = torch.distributions.Laplace(0.0, 1.0).sample((1_000_000,))
    assert pearson_kurtosis(laplace) == pytest.approx(6.0, abs=0.3)
    uniform = torch.rand(1_000_000, generator=g)
    assert pearson_kurtosis(uniform) == pytest.approx(1.8, abs=0.02)
    half = gauss.half()
    assert pearson_kurtosis(half) == pytest.approx(3.0, abs=0.05)
    assert half.dtype == torch.float16  # input untouched
    x = gauss[:1000].double()
    before = x.clone()
    pearson_kurtosis(x)
    assert torch.equal(x, before)
    with pytest.raises(ValueError):
        pearson_kurtosis(torch.ones(10))


def test_trimmed_zscores():
    v = np.array([1.0, 2.0, 3.0, 4.0, 100.0] + [2.5] * 15)
    z = trimmed_zscores(v, trim=0.05)  # drops one value from each end: 1.0 and 100.0
    kept = np.sort(v)[1:-1]
    assert z == pytest.approx((v - kept.mean()) / kept.std())
    assert trimmed_zscores(v, trim=0.0) == pytest.approx((v - v.mean()) / v.std())
    assert (trimmed_zscores(np.full(10, 0.1)) == 0).all()
    with pytest.raises(ValueError):
        trimmed_zscores(v, trim=0.5)


def test_adjacent_changes():
    v = [2.0, 4.0, 2.0, 3.0]
    assert adjacent_changes(v, "ratio") == pytest.approx([0.5, 2.0, 0.5, 1.5])
    assert adjacent_changes(v, "difference") == pytest.approx([-2.0, 2.0, -2.0, 1.0])
    assert adjacent_changes([5.0], "ratio").tolist() == [1.0]
    with pytest.raises(ValueError):
        adjacent_changes([1.0, 0.0], "ratio")
    with pytest.raises(ValueError):
        adjacent_changes(v, "log")


@pytest.mark.parametrize("mode", ["ratio", "difference"])
@pytest.mark.parametrize("layer", [0, 1, 13, 29])
@pytest.mark.parametrize("seed", range(3))
def test_flags_planted_outlier(mode, layer, seed):
    v = _noisy_flat(seed, level=2.0)
    v[layer] *= 5.0
    assert detect_outlier_layers(v, mode) == [layer]
    assert detect_outlier_layers(list(v), mode, top_m=1) == [layer]
    assert detect_outlier_layers(v, mode, top_m=0) == []


@pytest.mark.parametrize("mode", ["ratio", "difference"])
def test_two_outliers_ordered_by_z(mode):
    v = _noisy_flat(11)
    v[8] *= 3.0
    v[20] *= 6.0
    assert detect_outlier_layers(v, mode) == [20, 8]
    assert detect_outlier_layers(v, mode, top_m=1) == [20]


@pytest.mark.parametrize("mode", ["ratio", "difference"])
@pytest.mark.parametrize("seed", range(10))
def test_nothing_flagged_on_flat_profiles(mode, seed):
    assert detect_outlier_layers(_noisy_flat(seed, level=3.0), mode) == []
    assert detect_outlier_layers(np.full(30, 3.0), mode) == []
    assert detect_outlier_layers([3.0], mode) == []
