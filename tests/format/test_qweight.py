"""The stored form: 8-bit metadata stays finite and exact for constant meta groups; CSR and block outliers
round-trip through the stored tensors exactly."""

import pytest
import torch

from sensiquant import SensiquantError
from sensiquant.format import LayerSpec, QuantizedWeight, SparseOutliers, encode, groups
from sensiquant.format.qweight import RESIDUAL_MAX, BlockOutliers, residual_scale, store_meta
from sensiquant.format.spec import OUTLIER_FORMATS


@pytest.mark.parametrize("value", [8.0, 0.0, -3.0, 7.0, 1e-3])
def test_constant_meta_group_decodes_to_itself(value):
    """A group of 128 equal zero points (common with integer zeros) used to overflow the FP16 meta zero to -inf."""
    stored, decoded = store_meta(torch.full((4, 64), value), LayerSpec(quant_meta=True))
    assert torch.isfinite(stored["_qzero"].float()).all() and torch.isfinite(decoded).all()
    assert torch.allclose(decoded, torch.full((4, 64), value), rtol=2e-3, atol=0)


def test_varied_meta_group_is_unchanged_by_the_floor():
    """The floor only acts when a group's range is below 1/128 of its magnitude; ordinary groups keep range/255."""
    x = torch.tensor([[4.0] * 127 + [5.0]])
    stored, decoded = store_meta(x, LayerSpec(quant_meta=True))
    assert float(stored["_qscale"][0]) == float(torch.tensor(1 / 255.0).half())
    assert (decoded - x).abs().max() < 1e-3


# ------------------------------------------------------------------------------------------- outlier formats


def _minmax(w, spec):
    """An RTN (scale, zero) per group, enough to exercise encode without the methods."""
    pieces = groups.split_groups(w, spec.group_size)
    lo = torch.cat([p.amin(-1) for p in pieces], dim=1)
    hi = torch.cat([p.amax(-1) for p in pieces], dim=1)
    scale = ((hi - lo) / (2**spec.bits - 1)).clamp_min(1e-6)
    return scale, torch.round(-lo / scale)


def _encoded(shape, spec, density, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen)
    mask = torch.rand(*shape, generator=gen) < density
    w[mask] *= 6  # outliers are large weights, left out of the grid fit as the methods do
    fit = w.masked_fill(mask, 0.0)
    return w, mask, encode(w, *_minmax(fit, spec), spec, mask)


SPECS = [LayerSpec(grid="rtn", bits=3, group_size=64), LayerSpec(grid="rtn", bits=4, group_size=128, quant_meta=True),
         LayerSpec(grid="rtn", bits=2, group_size=None), LayerSpec(grid="rtn", bits=8, group_size=48)]


@pytest.mark.parametrize("outlier_format", OUTLIER_FORMATS)
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape, density", [((37, 200), 0.03), ((64, 576), 0.0099), ((5, 77), 0.2), ((3, 300), 0.5)])
def test_round_trip_through_the_stored_tensors(outlier_format, spec, shape, density):
    spec = spec.replace(outlier_format=outlier_format)
    w, mask, q = _encoded(shape, spec, density)
    again = QuantizedWeight.from_tensors(q.to_tensors(), shape, spec)
    assert type(again.outliers) is type(q.outliers) and again.outliers.nnz == int(mask.sum())
    assert torch.equal(again.dequantize(), q.dequantize())
    assert torch.equal(again.dequantize(torch.bfloat16), q.dequantize(torch.bfloat16))
    # everywhere else the weight is the grid, exactly; grid_at is the grid at given places, bit for bit
    assert torch.equal(q.dequantize()[~mask], q.grid()[~mask])
    positions = q.outliers.positions(shape[1])
    assert torch.equal(positions, mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(q.grid_at(positions), q.grid().reshape(-1)[positions])


@pytest.mark.parametrize("spec", SPECS)
def test_block_outliers_are_within_half_a_residual_step(spec):
    spec = spec.replace(outlier_format="block")
    w, mask, q = _encoded((48, 320), spec, 0.02)
    o = q.outliers
    assert isinstance(o, BlockOutliers)
    step = float(o.scale)
    assert o.scale.dtype == torch.float16 and 0 < step < float("inf")
    residual = (w - q.grid())[mask]
    assert step * RESIDUAL_MAX >= float(residual.abs().max())  # rounded up: no code clips
    assert float(o.codes.abs().max()) <= RESIDUAL_MAX
    err = (q.dequantize() - w)[mask].abs()
    assert bool((err <= step / 2 + 1e-6 * (w[mask].abs() + step * RESIDUAL_MAX)).all()), float(err.max() / step)


def test_csr_outliers_are_unchanged():
    spec = LayerSpec(grid="rtn", bits=3, group_size=64)
    assert spec.outlier_format == "csr" and LayerSpec.from_dict(
        {k: v for k, v in spec.to_dict().items() if k != "outlier_format"}) == spec  # old manifests read as CSR
    w, mask, q = _encoded((37, 300), spec, 0.05)
    assert isinstance(q.outliers, SparseOutliers)
    assert sorted(k for k in q.to_tensors() if k.startswith("outlier")) == \
        ["outlier_col_idx", "outlier_row_ptr", "outlier_values"]
    assert torch.equal(q.dequantize()[mask], w[mask].half().float())  # the FP16 value itself
    assert q.csr_outliers() is q.outliers


def test_block_outliers_convert_to_csr_with_their_exact_values():
    spec = LayerSpec(grid="rtn", bits=4, group_size=64, outlier_format="block")
    w, mask, q = _encoded((40, 192), spec, 0.05)
    csr = q.csr_outliers()
    assert csr.values.dtype == torch.float32 and csr.nnz == int(mask.sum())
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(csr.rows(), rows) and torch.equal(csr.col_idx.long(), cols)
    assert torch.equal(csr.values, q.dequantize()[rows, cols])


def test_any_mask_fits_even_every_position():
    """Blocks of 255 positions: a count and an offset are one byte each, whatever the mask (a gradient ranking
    can fill whole blocks)."""
    spec = LayerSpec(grid="rtn", bits=3, group_size=64, outlier_format="block")
    w = torch.randn(4, 255)
    mask = torch.zeros(4, 255, dtype=torch.bool)
    mask[1] = True  # every position of the second block
    q = encode(w, *_minmax(w, spec), spec, mask)
    assert q.outliers.counts.tolist() == [0, 255, 0, 0]
    assert torch.equal(QuantizedWeight.from_tensors(q.to_tensors(), (4, 255), spec).dequantize(), q.dequantize())
    full = encode(w, *_minmax(w, spec), spec, mask.fill_(True))
    assert full.outliers.nnz == 4 * 255 and full.outliers.counts.tolist() == [255] * 4


def test_residual_scale_is_a_positive_fp16_rounded_up():
    for max_abs in (0.0, 1e-12, 3e-3, 0.1, 1.0, 12.3456, 1e5):
        s = residual_scale(max_abs)
        assert s.dtype == torch.float16 and s.shape == (1,) and 0 < float(s) < float("inf")
        assert float(s) * RESIDUAL_MAX >= max_abs
        below = (s.view(torch.int16) - 1).view(torch.float16)  # the FP16 below is too small (unless at the floor)
        assert float(below) * RESIDUAL_MAX < max(max_abs, 1e-30) or float(below) == 0.0
    assert float(residual_scale(1e12)) == 65504.0  # capped: finite


def test_unknown_outlier_format_is_one_clear_error():
    with pytest.raises(SensiquantError, match="unknown outlier format 'coo': choose one of csr, block"):
        LayerSpec(outlier_format="coo")
    with pytest.raises(SensiquantError, match="outlier format"):
        LayerSpec.from_dict({"outlier_format": None})
