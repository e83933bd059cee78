import pytest
import torch

from sensiquant.format.packing import pack, packed_nbytes, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 7, 8, 64, 1001])
def test_pack_round_trip(bits, numel):
    codes = torch.randint(0, 2**bits, (numel,), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack(packed, bits, numel), codes)


def test_packing_is_dense():
    # 8 three-bit codes take exactly 3 bytes; 4-bit codes two per byte
    assert packed_nbytes(8, 3) == 3
    assert packed_nbytes(576 * 576, 4) == 576 * 576 // 2
    codes = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    # little-endian bit order: code i sits at bits 3i..3i+2
    word = sum(int(c) << (3 * i) for i, c in enumerate(codes))
    assert pack(codes, 3).tolist() == [word & 255, (word >> 8) & 255, (word >> 16) & 255]


def test_unsupported_bits():
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        pack(torch.zeros(8, dtype=torch.uint8), 5)
