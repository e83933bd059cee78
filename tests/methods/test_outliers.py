import pytest
import torch

from sensiquant.methods.outliers import SALIENCIES, global_threshold, saliency_scores, top_mask


def test_top_mask_counts():
    scores = torch.rand(40, 50)
    mask = top_mask(scores, 0.01)
    assert int(mask.sum()) == 20
    assert float(scores[mask].min()) >= float(scores[~mask].max())
    assert not top_mask(scores, 0.0).any()


def test_global_threshold_selects_ratio_of_all():
    a, b = torch.rand(10, 10), torch.rand(20, 10) * 2
    t = global_threshold([a, b], 0.1)
    assert int((a >= t).sum() + (b >= t).sum()) == 30


def test_hessian_score_is_obs():
    w = torch.randn(8, 16)
    x = torch.randn(100, 16)
    h = 2 / 100 * x.T @ x
    damped = h.double() + 0.01 * torch.diagonal(h).mean().double() * torch.eye(16, dtype=torch.float64)
    expected = w.pow(2) / torch.diagonal(torch.linalg.inv(damped)).float()
    assert torch.allclose(saliency_scores("hessian", w, hessian=h), expected, rtol=1e-4)


def test_other_scores():
    w = torch.randn(4, 6)
    g = torch.rand(4, 6)
    norm = torch.rand(6)
    assert torch.equal(saliency_scores("grad", w, grad_abs_sum=g), g)
    assert torch.allclose(saliency_scores("grad_weight", w, grad_abs_sum=g), (g * w).abs())
    assert torch.allclose(saliency_scores("fisher", w, grad_sq_sum=g), g * w * w)
    assert torch.allclose(saliency_scores("activation", w, input_norm=norm), w.abs() * norm)
    assert torch.equal(saliency_scores("magnitude", w), w.abs())
    r1 = saliency_scores("random", w, generator=torch.Generator().manual_seed(1))
    r2 = saliency_scores("random", w, generator=torch.Generator().manual_seed(1))
    assert torch.equal(r1, r2)
    assert set(SALIENCIES) == {"grad", "grad_weight", "fisher", "hessian", "activation", "magnitude", "random"}


def test_missing_statistics():
    with pytest.raises(ValueError, match="needs grad_abs_sum"):
        saliency_scores("grad", torch.randn(2, 2))
