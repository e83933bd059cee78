"""The stored form: 8-bit metadata stays finite and exact for constant meta groups."""

import pytest
import torch

from sensiquant.format import LayerSpec
from sensiquant.format.qweight import _store


@pytest.mark.parametrize("value", [8.0, 0.0, -3.0, 7.0, 1e-3])
def test_constant_meta_group_decodes_to_itself(value):
    """A group of 128 equal zero points (common with integer zeros) used to overflow the FP16 meta zero to -inf."""
    stored, decoded = _store(torch.full((4, 64), value), LayerSpec(quant_meta=True))
    assert torch.isfinite(stored["_qzero"].float()).all() and torch.isfinite(decoded).all()
    assert torch.allclose(decoded, torch.full((4, 64), value), rtol=2e-3, atol=0)


def test_varied_meta_group_is_unchanged_by_the_floor():
    """The floor only acts when a group's range is below 1/128 of its magnitude; ordinary groups keep range/255."""
    x = torch.tensor([[4.0] * 127 + [5.0]])
    stored, decoded = _store(x, LayerSpec(quant_meta=True))
    assert float(stored["_qscale"][0]) == float(torch.tensor(1 / 255.0).half())
    assert (decoded - x).abs().max() < 1e-3
