"""The SpQR and OWQ peers (bench/peers_spqr_owq.py) on the tiny model; skipped without their local checkouts."""

import json
import math

import pytest
import torch
from harness import run_peers

from bench import peers_spqr_owq as adapter
from bench.peer_api import PeerContext, block_linear_names

SETUP = "bash bench/peers_spqr_owq_setup.sh"
needs_spqr = pytest.mark.skipif(adapter.PEERS[0].available() is not None,
                                reason=f"no SpQR checkout at {adapter.SPQR_SRC} ({SETUP})")
needs_owq = pytest.mark.skipif(adapter.PEERS[1].available() is not None,
                               reason=f"no OWQ checkout at {adapter.OWQ_SRC} ({SETUP})")


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory):
    """The tiny model with an MLP width of 192: SpQR quantizes its scales in groups of 16 output rows, which the
    suite's width of 200 does not divide (SmolLM2's and Qwen's widths do)."""
    from bench.tiny_model import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny16"), intermediate_size=192)


@pytest.fixture
def ctx(tiny16, tmp_path):
    gen = torch.Generator().manual_seed(1)
    windows = {"wikitext2": torch.randint(0, 256, (1, 64), generator=gen)}
    return PeerContext(windows, torch.randint(0, 256, (2, 64), generator=gen), None, tmp_path, threads=1,
                       model_name=str(tiny16))


def _weights(model):
    return {n: model.get_submodule(n).weight.detach().clone() for n in block_linear_names(model)}


def test_bits_count_what_each_format_stores():
    # SpQR, 576 x 576, w3 g16: codes, 2 x 3-bit stats per 16, 4 FP16 second-level values per 16 x 16 stats,
    # 32 bits per outlier, int32 CSR row offsets and input permutation
    m = n = 576
    assert adapter.spqr_bits(m, n, 3, 16, 100) == m * n * 3 + 36 * m * 6 + 36 * 36 * 64 + 3200 + 32 * 577 + 32 * 576
    paper = 3 + 6 / 16 + 64 / 256  # its get_average_number_of_bits without outliers
    assert adapter.spqr_bits(m, n, 3, 16, 0) / (m * n) == pytest.approx(paper + 32 * 577 / (m * n) + 32 / m)
    # OWQ, per-channel: codes for all columns, FP16 scale + 4-bit zero per row, FP16 weak columns + int32 indices
    assert adapter.owq_bits(576, 1536, 3, 2) == 576 * 1536 * 3 + 576 * 20 + 2 * (576 * 16 + 32)
    # grouped: one scale and zero per group of the non-weak columns (574 -> 18 groups of 32)
    assert adapter.owq_bits(576, 576, 3, 2, 32) == 576 * 576 * 3 + 576 * 18 * 20 + 2 * (576 * 16 + 32)


@needs_spqr
def test_spqr_runs_its_own_driver_on_the_cpu(ctx):
    from sensiquant.eval import nll_of_windows

    base, _ = ctx.load_base()
    before = _weights(base)
    run = adapter.run_spqr("w3g16", ctx)
    after = _weights(run.model)
    assert all(not torch.equal(before[n], after[n]) for n in before)  # every block linear quantized
    assert run.quantized_params == sum(w.numel() for w in before.values())
    share = run.extra["outlier_share"]
    assert 0 < share < 0.05
    # its own count, and ours: the same plus the CSR row offsets and the input permutation (int32 each)
    assert run.extra["paper_bits_per_param"] == round(3 + 6 / 16 + 64 / 256 + 32 * share, 2)
    overhead = sum(32 * (w.shape[0] + 1 + w.shape[1]) for w in before.values()) / run.quantized_params
    assert run.bits_per_param == pytest.approx(3 + 6 / 16 + 64 / 256 + 32 * share + overhead)
    base_nll, count = nll_of_windows(base, ctx.windows["wikitext2"])
    nll, _ = nll_of_windows(run.model, ctx.windows["wikitext2"])
    assert math.isfinite(nll) and abs(nll - base_nll) / count < 0.5
    assert "position_embeddings" in run.notes and "datautils" in run.notes


@needs_owq
def test_owq_keeps_weak_columns_and_quantizes_the_rest(ctx, monkeypatch):
    # --target_bit 3.01 gives the tiny model's 96-wide layers no weak column; --target_rank 4 gives every linear 4
    monkeypatch.setitem(adapter.OWQ_SETTINGS, "w3-rank4", dict(wbits=3, target_rank=4))
    base, _ = ctx.load_base()
    before = _weights(base)
    run = adapter.run_owq("w3-rank4", ctx)
    after = _weights(run.model)
    expected = 0
    for name, weight in after.items():
        assert not torch.equal(before[name], weight)
        # per-channel 3-bit: at most 8 levels per row, plus the 4 FP16 weak columns
        assert max(len(torch.unique(row)) for row in weight) == 8 + 4
        expected += adapter.owq_bits(*weight.shape, 3, 4)
    assert run.bits_per_param == pytest.approx(expected / run.quantized_params)
    assert run.extra["weak_share"] == pytest.approx(sum(4 * w.shape[0] for w in after.values()) / run.quantized_params)


@needs_spqr
@needs_owq
def test_harness_runs_both_peers(tiny16, data_dir, tmp_path):
    _, out = run_peers(tiny16, "spqr,owq", "w3g32,w3g32-t3.01", data_dir, tmp_path)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["peer"], r["setting"]) for r in rows] == [("spqr", "w3g32"), ("owq", "w3g32-t3.01")]
    for row in rows:
        assert "error" not in row, row
        assert row["ppl_wikitext2"] > 1 and row["version"].startswith("git ")
    assert 3.3 < rows[1]["bits_per_param"] < 4.0 and rows[0]["bits_per_param"] > 3.3
