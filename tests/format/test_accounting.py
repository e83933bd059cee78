import math

import pytest
import torch

from sensiquant.format import LayerSpec, bits_per_param, outlier_bits, storage_bits, stored_tensors
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


def test_hand_count_block_outliers():
    # 100 outliers in a 576 x 1536 matrix: one count byte per 255 weights, offset + residual byte each, FP16 scale
    spec = LayerSpec(bits=3, group_size=64, outlier_format="block")
    base = storage_bits((576, 1536), spec)
    assert base == storage_bits((576, 1536), spec.replace(outlier_format="csr"))  # no outliers, nothing stored
    assert storage_bits((576, 1536), spec, n_outliers=100) - base == math.ceil(576 * 1536 / 255) * 8 + 100 * 16 + 16
    # a tail block: 10 x 77 = 770 positions -> 4 blocks (3 of 255, 1 of 5)
    assert storage_bits((10, 77), spec, n_outliers=9) - storage_bits((10, 77), spec) == 4 * 8 + 9 * 16 + 16
    assert outlier_bits((576, 1536), 100, outlier_format="block") == math.ceil(576 * 1536 / 255) * 8 + 100 * 16 + 16
    assert outlier_bits((576, 1536), 100) == 100 * (16 + 16) + 577 * 8  # CSR stays the default


# bits per outlier of block outliers on SmolLM2's shapes: 16 + 8 / (255 * density) + the scale
@pytest.mark.parametrize("shape", [(576, 576), (192, 576), (1536, 576), (576, 1536)])
@pytest.mark.parametrize("density, expected", [(0.0099, 19.17), (0.005, 22.28), (0.019, 17.65), (0.02, 17.57)])
def test_block_outliers_bits_per_outlier(shape, density, expected):
    nnz = round(density * shape[0] * shape[1])
    per_outlier = outlier_bits(shape, nnz, outlier_format="block") / nnz
    assert per_outlier == pytest.approx(expected, abs=0.03)
    assert per_outlier < 2 / 3 * outlier_bits(shape, nnz) / nnz  # CSR: 33-38 bits
    if density >= 0.0099:
        assert per_outlier <= 20  # the target holds from GWQ's default share up


@pytest.mark.parametrize("outlier_format", ["csr", "block"])
@pytest.mark.parametrize("shape", [(37, 300), (64, 576), (5, 77), (96, 96), (3, 1000)])
@pytest.mark.parametrize("density", [0.001, 0.0099, 0.05, 0.3])
def test_stored_outlier_bytes_are_the_accounting(outlier_format, shape, density):
    gen = torch.Generator().manual_seed(shape[0] * shape[1])
    w = torch.randn(*shape, generator=gen)
    mask = torch.rand(*shape, generator=gen) < density
    mask[-1, -1] = True  # at least one outlier, in the (possibly partial) last block
    for spec in (LayerSpec(grid="rtn", bits=3, group_size=64), LayerSpec(grid="rtn", bits=4, group_size=128,
                                                                          quant_meta=True)):
        spec = spec.replace(outlier_format=outlier_format)
        q = quantize_weight(w, spec, outlier_mask=mask)
        assert _stored_bits(q) == storage_bits(shape, spec, n_outliers=int(mask.sum()))
        tensors = q.to_tensors()
        assert stored_tensors(shape, spec, int(mask.sum())) == {k: (t.dtype, tuple(t.shape)) for k, t in
                                                                tensors.items()}
