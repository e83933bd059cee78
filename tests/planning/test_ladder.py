import pytest

from sensiquant.errors import SensiquantError
from sensiquant.format import bits_per_param
from sensiquant.planning import DEFAULT_LADDER, LadderConfig, make_ladder, step_up


def test_name_and_nominal_bits():
    config = LadderConfig(3, 128)
    assert config.name == "b3g128"
    assert config.nominal_bits_per_param == pytest.approx(3 + 16 / 128 + 64 / 16384)
    assert LadderConfig(4, 64).nominal_bits_per_param == pytest.approx(4 + 16 / 64 + 64 / (64 * 128))
    assert LadderConfig.from_name("b4g64") == LadderConfig(4, 64)
    with pytest.raises(SensiquantError):
        LadderConfig.from_name("4bit")


def test_invalid_configs():
    with pytest.raises(SensiquantError):
        LadderConfig(5, 64)
    with pytest.raises(SensiquantError):
        LadderConfig(4, 0)


def test_default_ladder_is_all_combinations_sorted():
    assert len(DEFAULT_LADDER) == 12
    assert {(c.bits, c.group_size) for c in DEFAULT_LADDER} == {(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128)}
    nominal = [c.nominal_bits_per_param for c in DEFAULT_LADDER]
    assert nominal == sorted(nominal)
    names = [c.name for c in DEFAULT_LADDER]
    # b4g64 sits between b4g128 and b4g32, all above every 3-bit rung (even b3g32)
    assert names.index("b3g32") < names.index("b4g128") < names.index("b4g64") < names.index("b4g32")
    assert names[0] == "b2g128" and names[-1] == "b8g32"
    assert make_ladder(bits=(4, 2), group_sizes=(64, 128)) == tuple(
        LadderConfig(b, g) for b, g in ((2, 128), (2, 64), (4, 128), (4, 64))
    )


def test_step_up_moves_and_clamps():
    assert step_up(LadderConfig(3, 128), DEFAULT_LADDER, 1) == LadderConfig(3, 64)
    assert step_up(LadderConfig(3, 128), DEFAULT_LADDER, 3) == LadderConfig(4, 128)
    assert step_up(LadderConfig(3, 128), DEFAULT_LADDER, 0) == LadderConfig(3, 128)
    assert step_up(LadderConfig(8, 64), DEFAULT_LADDER, 5) == LadderConfig(8, 32)
    assert step_up(LadderConfig(2, 128), DEFAULT_LADDER, 100) == DEFAULT_LADDER[-1]
    assert step_up(LadderConfig(2, 64), DEFAULT_LADDER, -3) == LadderConfig(2, 128)
    # an unsorted caller-built ladder behaves as the sorted one
    assert step_up(LadderConfig(2, 128), list(reversed(DEFAULT_LADDER)), 1) == LadderConfig(2, 64)
    with pytest.raises(ValueError):
        step_up(LadderConfig(3, 16), DEFAULT_LADDER, 1)


@pytest.mark.parametrize("config", DEFAULT_LADDER, ids=lambda c: c.name)
def test_spec_storage_matches_nominal(config):
    spec = config.spec()
    assert (spec.grid, spec.bits, spec.group_size, spec.quant_meta, spec.meta_group_size) == (
        "hqq", config.bits, config.group_size, True, 128,
    )
    assert bits_per_param((4096, 4096), spec) == pytest.approx(config.nominal_bits_per_param, rel=0, abs=1e-12)
    assert config.spec("rtn").grid == "rtn"
