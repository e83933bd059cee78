import pytest
import torch

from sensiquant.format import LayerSpec, bits_per_param, storage_bits
from sensiquant.methods import quantize_weight


def _stored_bits(q):
    return 8 * sum(t.numel() * t.element_size() for t in q.to_tensors().values())


def test_hand_count_fp16_meta():
    # 576 x 576, 4-bit g64: codes 4 bits, scale + zero FP16 per 64 weights -> 4 + 32/64 = 4.5
    assert bits_per_param((576, 576), LayerSpec(bits=4, group_size=64)) == 4.5
    # g128 on 576 columns: 4 full groups + one 64-wide tail = 5 groups a row -> 3 + 32 * 5 / 576
    assert bits_per_param((576, 576), LayerSpec(bits=3, group_size=128)) == pytest.approx(3 + 160 / 576)
    # per-channel: one group a row
    assert bits_per_param((10, 1536), LayerSpec(bits=2, group_size=None)) == pytest.approx(2 + 32 / 1536)


def test_hand_count_quantized_meta():
    # when everything divides: b + 2*8/g + 2*32/(g*128) -- scales and zeros both 8-bit with an FP16 scale and
    # zero per 128 (the MXQ paper's b + 2*8/g + 32/(g*128) gives the zeros one global scale instead)
    shape = (1024, 4096)
    spec = LayerSpec(bits=3, group_size=128, quant_meta=True)
    assert bits_per_param(shape, spec) == pytest.approx(3 + 16 / 128 + 64 / (128 * 128))
    # odd count: 7 rows x 1 group = 7 scales -> 8 bytes padded, 1 meta group (2 x FP16)
    spec = LayerSpec(bits=4, group_size=None, quant_meta=True)
    assert storage_bits((7, 64), spec) == 7 * 64 * 4 + 2 * (8 * 8 + 32)


def test_hand_count_outliers():
    # 100 outliers in a 576 x 1536 matrix: FP16 value + int16 column + 577 int8 row pointers
    spec = LayerSpec(bits=3, group_size=64)
    base = storage_bits((576, 1536), spec)
    assert storage_bits((576, 1536), spec, n_outliers=100) - base == 100 * (16 + 16) + 577 * 8
    # 300 outliers need int16 row pointers; 64 columns fit uint8 column indices
    base = storage_bits((10, 64), spec)
    assert storage_bits((10, 64), spec, n_outliers=300) - base == 300 * (16 + 8) + 11 * 16


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size,quant_meta", [(64, False), (128, True), (None, False), (48, True)])
def test_accounting_matches_stored_tensors(bits, group_size, quant_meta):
    w = torch.randn(37, 200)
    spec = LayerSpec(grid="rtn", bits=bits, group_size=group_size, quant_meta=quant_meta)
    assert _stored_bits(quantize_weight(w, spec)) == storage_bits(w.shape, spec)


def test_accounting_matches_stored_outliers():
    w = torch.randn(37, 300)
    mask = w.abs() > 2.5
    spec = LayerSpec(grid="rtn", bits=3, group_size=64)
    q = quantize_weight(w, spec, outlier_mask=mask)
    assert _stored_bits(q) == storage_bits(w.shape, spec, n_outliers=int(mask.sum()))
