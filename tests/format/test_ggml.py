"""llama.cpp block types as grids: byte layouts against the gguf package's dequantizers, round trips, accounting,
fallbacks and the spec's checks."""

import gguf
import numpy as np
import pytest
import torch

from sensiquant import LayerSpec
from sensiquant.errors import SensiquantError
from sensiquant.format import ggml
from sensiquant.format.accounting import storage_bits
from sensiquant.format.qweight import QuantizedWeight, encode
from sensiquant.methods.gptq import gptq_quantize
from sensiquant.methods.grid import fit_scale_zero, symmetric_scale

TYPES = list(ggml.TYPES)


def _weights(rows=6, cols=512):
    w = torch.randn(rows, cols) * 0.05
    w[0, :32] += 0.3  # a group whose values are all positive: the mins clamp to 0
    w[1, 40] = -0.6  # one large negative weight: symmetric scales take its sign
    return w


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("grid", ["rtn", "hqq"])
def test_blocks_dequantize_in_gguf_as_in_sensiquant(name, grid):
    w = _weights()
    spec = LayerSpec(grid=grid, gguf=name)
    qw = encode(w, *fit_scale_zero(w, spec), spec)
    data = qw.to_tensors()["qweight"]
    ref = gguf.quants.dequantize(data.numpy().reshape(w.shape[0], -1), getattr(gguf.GGMLQuantizationType, name))
    np.testing.assert_allclose(ref, qw.dequantize().numpy(), rtol=0, atol=1e-6)
    back = QuantizedWeight.from_tensors({"qweight": data}, tuple(w.shape), spec)
    assert torch.equal(back.codes, qw.codes) and torch.equal(back.dequantize(), qw.dequantize())
    t = ggml.TYPES[name]
    assert data.numel() == w.shape[0] * w.shape[1] // t.block * t.nbytes
    assert storage_bits(tuple(w.shape), spec) == 8 * data.numel()
    rel = float(((qw.dequantize() - w) ** 2).mean() / (w**2).mean())
    assert rel < {2: 0.2, 3: 0.05, 4: 0.012, 5: 0.004, 6: 0.001, 8: 1e-4}[t.bits]


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_searched_grid_beats_llama_cpp_reference_rounding(name):
    """The hqq grid (searched symmetric scales, HQQ mins) is at least as close as gguf's reference quantizer."""
    w = _weights(16, 256)
    qt = getattr(gguf.GGMLQuantizationType, name)
    ref = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qt), qt))
    spec = LayerSpec(grid="hqq", gguf=name)
    ours = encode(w, *fit_scale_zero(w, spec), spec).dequantize()
    assert float(((ours - w) ** 2).sum()) <= float(((ref - w) ** 2).sum())


def test_symmetric_search_never_loses_to_plain_rounding():
    p = torch.randn(32, 8, 32)
    def err(s, zero):
        return ((p - torch.round(p / s).clamp(-zero, zero - 1) * s) ** 2).sum(-1)

    for zero in (4, 8, 16):
        plain, searched = symmetric_scale(p, zero, search=False), symmetric_scale(p, zero)
        assert bool((err(searched, zero) <= err(plain, zero) + 1e-7).all())


def test_fallback_types_for_rows_that_are_not_whole_super_blocks():
    assert ggml.fit_type("Q4_K", 576) == "Q5_0" and ggml.fit_type("Q4_K", 1536) == "Q4_K"
    assert ggml.fit_type("Q3_K", 896) == "Q4_0" and ggml.fit_type("Q6_K", 96) == "Q8_0"
    assert ggml.fit_type("Q2_K", 544) == "Q4_0" and ggml.fit_type("Q5_K", 544) == "Q5_1"
    with pytest.raises(SensiquantError, match="fit no GGUF block"):
        ggml.fit_type("Q4_K", 200)


def test_spec_takes_bits_and_groups_from_the_type_and_round_trips():
    spec = LayerSpec(gguf="Q3_K", bits=4, group_size=128)
    assert (spec.bits, spec.group_size) == (3, 16)
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    assert LayerSpec(gguf="Q6_K").bits == 6  # beyond the widths of the packed format: stored as blocks
    with pytest.raises(SensiquantError, match="unknown GGUF type"):
        LayerSpec(gguf="Q4_2")
    with pytest.raises(SensiquantError, match="no outliers"):
        LayerSpec(gguf="Q4_0", outlier_ratio=0.01)
    with pytest.raises(SensiquantError, match="no outliers"):
        LayerSpec(gguf="Q4_K", quant_meta=True)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q3_K"])
def test_gptq_on_a_gguf_grid_lowers_the_output_error(name):
    torch.manual_seed(1)
    x = torch.randn(2048, 256) @ (torch.eye(256) + 0.3 * torch.randn(256, 256))  # correlated inputs
    h = x.t() @ x / x.shape[0]
    w = torch.randn(64, 256) * 0.05
    spec = LayerSpec(grid="hqq", gguf=name)
    rtn = encode(w, *fit_scale_zero(w, spec), spec)
    gq = gptq_quantize(w, h, spec, act_order=True)
    assert gq.spec.gguf == name and gq.to_tensors()["qweight"].numel() == rtn.to_tensors()["qweight"].numel()

    def out_err(q):
        d = q.dequantize() - w
        return float(torch.einsum("oi,ij,oj->", d, h, d))
    assert out_err(gq) < 0.9 * out_err(rtn)


@pytest.mark.parametrize("nonpositive_min", [False, True])
def test_weighted_asymmetric_search_beats_min_max_under_its_weights(nonpositive_min):
    from sensiquant.methods.grid import asymmetric_search

    p = torch.randn(64, 4, 16) * 0.05 + 0.01
    wt = torch.rand(1, 4, 16) ** 2 * 10
    s, z = asymmetric_search(p, 3, wt, nonpositive_min)
    lo, hi = p.amin(-1, keepdim=True), p.amax(-1, keepdim=True)
    if nonpositive_min:
        lo = lo.clamp_max(0)
        assert bool((z >= 0).all())  # code 0 at or below zero
    s0, z0 = (hi - lo) / 3, -lo / ((hi - lo) / 3)

    def err(s, z):
        return (wt * (p - (torch.round(p / s + z).clamp(0, 3) - z) * s) ** 2).sum(-1)
    assert bool((err(s, z) <= err(s0, z0) + 1e-9).all())
    assert float(err(s, z).sum()) < 0.9 * float(err(s0, z0).sum())
