"""kill -9 at random moments of saves over one checkpoint directory (bench/fuzz_checkpoint.py runs 100 kills): the
directory always holds a complete checkpoint, the one before the interrupted save or the one it was writing, with
exactly its logits; what the killed saves left is removed by the next save."""

import pytest
from checkpoint_tools import checkpoint_pair

from bench.fuzz_checkpoint import run_kills


@pytest.fixture(scope="module")
def checkpoints(tiny_llama, tmp_path_factory):
    return checkpoint_pair(tiny_llama, tmp_path_factory.mktemp("checkpoints"))


def test_sigkill_during_saves_leaves_old_or_new_checkpoint(checkpoints, tmp_path):
    a, b = checkpoints
    result = run_kills(a, b, tmp_path, kills=15, seed=3)
    assert result["failures"] == 0, result["failure_list"]
    assert result["mid_save"] + result["between_saves"] + result["before_first_save"] == 15
    assert result["mid_save"] >= 8 and result["found_old"] + result["found_new"] == result["mid_save"]
    assert result["temporaries_left_after_a_clean_save"] == 0
