import json

import pytest
import torch

from sensiquant.cli import main
from sensiquant.errors import SensiquantError
from sensiquant.format import LayerSpec
from sensiquant.io import load_model, save_quantized
from sensiquant.pipeline import QuantConfig, quantize_model
from sensiquant.runtime import convert_to_fast
from sensiquant.runtime import fast as fast_kernels
from sensiquant.runtime.speed import greedy_generate, measure_speed, prompt_ids


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_llama, tmp_path_factory):
    model, tok = load_model(str(tiny_llama))
    config = QuantConfig(default=LayerSpec(grid="hqq", bits=4, group_size=32))
    report = quantize_model(model, config, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "q4"
    save_quantized(model, tok, out, config, report)
    return out, model, tok


def test_greedy_generation_from_reloaded_checkpoint_equals_in_memory(tiny_checkpoint, monkeypatch):
    path, model, tok = tiny_checkpoint
    ids = prompt_ids(tok, 24, "hello world, " * 10)
    expected, _, _ = greedy_generate(model, ids, 12)
    reloaded, _ = load_model(str(path))
    got, prefill, decode = greedy_generate(reloaded, ids, 12)
    assert got == expected and prefill > 0 and decode > 0
    # the transformers generate() API runs on the reloaded model and agrees
    out = reloaded.generate(ids, max_new_tokens=12, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == expected
    # and so does the reloaded checkpoint through each fast kernel (fp32): the packed C++ kernel (or the dequantize
    # fallback without it), then PyTorch's int4pack kernel (taken in fp32 only when forced: it is slow there)
    # (the tiny model's 200-wide MLP is no multiple of 16, so its down/up layers stay on the packed path)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # int4pack wherever it can
    for int4pack_dtypes, wanted in (((torch.bfloat16,), {"packed", "dequant"}), ((torch.float32,), {"int4pack"})):
        monkeypatch.setattr(fast_kernels, "INT4PACK_DTYPES", int4pack_dtypes)
        monkeypatch.setattr(fast_kernels, "MEMORY_SLACK", 1.0)  # the tiny model's groups of 32 carry more metadata
        fast_model, _ = load_model(str(path))
        paths = convert_to_fast(fast_model, dtype=torch.float32)
        assert wanted & set(paths.values()) and set(paths.values()) <= wanted | {"packed", "dequant"}
        fast, _, _ = greedy_generate(fast_model, ids, 12)
        assert fast == expected
        out = fast_model.generate(ids, max_new_tokens=12, do_sample=False)
        assert out[0, ids.shape[1]:].tolist() == expected


def test_measure_speed_reports_rates(tiny_checkpoint):
    _, model, tok = tiny_checkpoint
    r = measure_speed(model, tok, prompt_tokens=16, new_tokens=5, text="abc " * 50)
    assert r.prefill_tokens_per_second > 0 and r.decode_tokens_per_second > 0 and len(r.generated) == 5
    assert r.peak_rss_mb > 0 and r.threads == torch.get_num_threads()
    with pytest.raises(SensiquantError):
        measure_speed(model, tok, new_tokens=1)


def test_cli_generate_and_bench_speed(tiny_checkpoint, data_dir, capsys):
    path, _, _ = tiny_checkpoint
    assert main(["generate", str(path), "hello", "--max-new-tokens", "6", "--dtype", "float32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 6 and isinstance(out["completion"], str)
    assert main(["bench-speed", str(path), "--prompt-tokens", "16", "--new-tokens", "4", "--data-dir",
                 str(data_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fast"] and out["resident_weight_bytes"] > 0 and out["stored_weight_bytes"] > 0
    assert out["prompt_tokens"] == 16 and out["decode_tokens_per_second"] > 0 and out["bits_per_param"] > 4
    assert main(["generate", str(path), "hi", "--max-new-tokens", "1"]) == 2


def test_fp32_attention_keeps_the_logits(tiny_llama):
    """Attention scores in fp32: fp32 models unchanged; bf16 logits no further from fp32 than bf16 SDPA's."""
    from sensiquant.runtime.attention import FP32_SDPA, use_fp32_attention

    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, _ = load_model(str(tiny_llama))
        model.to(dtype)
        with torch.inference_mode():
            logits[dtype, "sdpa"] = model(ids).logits.float()
            assert use_fp32_attention(model) and model.config._attn_implementation == FP32_SDPA
            logits[dtype, "fp32"] = model(ids).logits.float()
    ref = logits[torch.float32, "sdpa"]
    torch.testing.assert_close(logits[torch.float32, "fp32"], ref, rtol=0, atol=0)  # fp32 goes through unchanged
    bf16_error = (logits[torch.bfloat16, "sdpa"] - ref).abs().max()
    assert 0 < (logits[torch.bfloat16, "fp32"] - ref).abs().max() <= 1.5 * bf16_error
