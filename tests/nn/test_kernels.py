import pytest
import torch
import torch.nn.functional as F

from sensiquant.config import LayerSpec, QuantConfig
from sensiquant.models import load_model
from sensiquant.nn import QuantLinear
from sensiquant.nn.kernels import FastQuantLinear, convert_to_fast, kernel_group, quant_weight_bytes
from sensiquant.quant import quantize_weight
from sensiquant.quantize import quantize_model


def _layer(out_f, in_f, bits, group, quant_meta=False, outliers=0.0, bias=True, method="rtn"):
    w = torch.randn(out_f, in_f)
    mask = None
    if outliers:
        mask = torch.rand(out_f, in_f) < outliers
    qw = quantize_weight(w, LayerSpec(method=method, bits=bits, group_size=group, quant_meta=quant_meta),
                         outlier_mask=mask)
    return QuantLinear.from_quantized(qw, torch.randn(out_f) if bias else None)


def _tolerance(x, q, dtype):
    """fp32: a few ulps of the largest partial sum |x| @ |W|^T; bf16: bf16 rounding of the weight and the output."""
    bound = (x.abs().float() @ q.dequantize().abs().t()).max().item()
    eps = torch.finfo(dtype).eps
    return 8 * eps * bound if dtype == torch.float32 else 4 * eps * bound


def test_kernel_group_divides_every_group():
    assert kernel_group(576, 128) == 64  # 4 x 128 + a tail of 64
    assert kernel_group(576, 64) == 64 and kernel_group(1536, 128) == 128 and kernel_group(512, 256) == 256
    assert kernel_group(96, 48) is None and kernel_group(100, 32) is None
    assert kernel_group(256, None) == 256  # per channel


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, 96, None])
@pytest.mark.parametrize("outliers", [0.0, 0.02])
def test_fast_path_matches_dequantize_and_matmul(bits, group, outliers):
    q = _layer(48, 192, bits, group, quant_meta=group == 64, outliers=outliers)
    fast = FastQuantLinear(q, dtype=torch.float32)
    expected_path = "int4pack" if bits <= 4 and kernel_group(192, group) else "dequant"
    assert fast.path == expected_path
    for shape in [(1, 1, 192), (2, 5, 192), (7, 192)]:
        x = torch.randn(*shape)
        ref = F.linear(x, q.dequantize(), q.bias)
        got = fast(x)
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= _tolerance(x.reshape(-1, 192), q, torch.float32) + 1e-6


@pytest.mark.parametrize("bits", [3, 4])
def test_bf16_path_within_bf16_rounding(bits):
    q = _layer(64, 576, bits, 128, outliers=0.01)
    fast = FastQuantLinear(q, dtype=torch.bfloat16)
    x = torch.randn(3, 576)
    ref = F.linear(x, q.dequantize(), q.bias)
    got = fast(x.bfloat16()).float()
    assert (got - ref).abs().max().item() <= _tolerance(x, q, torch.bfloat16)


def test_odd_output_size_falls_back_to_the_reference():
    q = _layer(40, 96, 4, 32, outliers=0.05)
    fast = FastQuantLinear(q, dtype=torch.float32)
    assert fast.path == "dequant"
    x = torch.randn(3, 96)
    torch.testing.assert_close(fast(x), F.linear(x, q.dequantize(), q.bias))


def test_widen_off_keeps_low_bits_packed():
    q = _layer(32, 128, 3, 64)
    fast = FastQuantLinear(q, dtype=torch.float32, widen=False)
    assert fast.path == "dequant"
    assert fast.weight_bytes() * 8 == q.storage_bits() - 0  # exactly the stored bits
    x = torch.randn(2, 128)
    torch.testing.assert_close(fast(x), F.linear(x, q.dequantize(), q.bias))


def test_int4_bytes_match_bits_per_param():
    q = _layer(128, 512, 4, 64, bias=False)
    fast = FastQuantLinear(q, dtype=torch.bfloat16)
    assert fast.weight_bytes() * 8 == q.storage_bits()  # 4-bit codes + 16-bit scale and zero per 64


def test_convert_to_fast_keeps_the_logits(tiny_llama):
    model, tok = load_model(str(tiny_llama))
    quantize_model(model, QuantConfig(default=LayerSpec(method="hqq", bits=4, group_size=32)), progress=False)
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        paths = convert_to_fast(model, dtype=torch.float32)
        got = model(ids).logits
    assert set(paths.values()) == {"int4pack", "dequant"}  # the 200-wide MLP outputs are not a multiple of 16
    assert (got - ref).abs().max().item() < 1e-3
    assert quant_weight_bytes(model) > 0
