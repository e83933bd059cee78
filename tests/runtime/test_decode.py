"""The lean decode path: the same logits and tokens as transformers' forward, fused projections equal to their
parts without a second copy, and clear refusals."""

import json

import pytest
import torch
from torch import nn

from bench.tiny_model import make_tiny_llama
from sensiquant.cli import main
from sensiquant.format import LayerSpec
from sensiquant.io import load_model, save_quantized
from sensiquant.methods import quantize_weight
from sensiquant.pipeline import QuantConfig, quantize_model
from sensiquant.runtime import QuantLinear, convert_to_fast, extension_available
from sensiquant.runtime.decode import LeanDecodeError, LeanDecoder, unsupported_reason
from sensiquant.runtime.fast import FastQuantLinear, fuse_rows
from sensiquant.runtime.layout import int4pack_available
from sensiquant.runtime.speed import generator, greedy_generate, measure_speed

needs_ext = pytest.mark.skipif(not extension_available(), reason="C++ extension unavailable")


def _qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # q/k/v biases are zero at init: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


def _logits_both_ways(model, ids, split):
    """transformers' logits of ids, and the lean decoder's: a prefill of ids[:split], then one token per step."""
    with torch.inference_mode():
        ref = model(input_ids=ids[None]).logits[0].float()
        dec = LeanDecoder(model, max_len=ids.shape[0])
        lean = [dec.forward(ids[:split], last_only=False).float()]
        lean += [dec.forward(ids[i:i + 1]).float() for i in range(split, ids.shape[0])]
    return ref, torch.cat(lean)


@pytest.mark.parametrize("make", [make_tiny_llama, _qwen2], ids=["llama", "qwen2-bias"])
def test_lean_logits_equal_transformers_in_fp32(make):
    model = make()
    ids = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(1))
    ref, lean = _logits_both_ways(model, ids, 25)
    torch.testing.assert_close(lean, ref, rtol=1e-4, atol=1e-4)
    # the model itself runs on unchanged after fusing (its projections are views of the fused ones)
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids[None]).logits[0], ref, rtol=0, atol=0)


def test_lean_greedy_tokens_equal_transformers_and_prefill_chunks_agree():
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    expected, _, _ = greedy_generate(model, ids, 20)
    dec = LeanDecoder(model, max_len=64)
    got, prefill, decode = dec.generate(ids, 20)
    assert got == expected and prefill > 0 and decode > 0
    assert dec.generate(ids, 20)[0] == expected  # generate resets the cache
    # a prompt given in two chunks (the second one masked against the first) gives the same next logits
    with torch.inference_mode():
        dec.reset()
        whole = dec.forward(ids[0]).float()
        dec.reset()
        dec.forward(ids[0, :17])
        torch.testing.assert_close(dec.forward(ids[0, 17:]).float(), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(LeanDecodeError, match="holds 64 positions"):
        dec.generate(ids, 40)


@needs_ext
@pytest.mark.parametrize("spec", [LayerSpec(grid="hqq", bits=4, group_size=32),
                                  LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True)],
                         ids=["4-bit", "3-bit-meta8"])
def test_lean_decode_of_a_fast_quantized_model(tmp_path, tiny_llama, spec):
    model, tok = load_model(str(tiny_llama))
    config = QuantConfig(default=spec)
    report = quantize_model(model, config, progress=False)
    save_quantized(model, tok, tmp_path / "q", config, report)
    fast, _ = load_model(str(tmp_path / "q"))
    convert_to_fast(fast, dtype=torch.float32)
    ids = torch.randint(0, 256, (36,), generator=torch.Generator().manual_seed(3))
    ref, lean = _logits_both_ways(fast, ids, 20)
    torch.testing.assert_close(lean, ref, rtol=1e-4, atol=1e-4)
    # greedy tokens of the bf16 model equal transformers' on the same weights
    convert = load_model(str(tmp_path / "q"))[0]
    convert_to_fast(convert, dtype=torch.bfloat16)
    expected, _, _ = greedy_generate(convert, ids[None, :20], 8)
    assert LeanDecoder(convert, max_len=40).generate(ids[None, :20], 8)[0][:4] == expected[:4]


def _quant(out_f, in_f, spec, seed, outliers=0.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    mask = (torch.rand(out_f, in_f, generator=gen) < outliers) if outliers else None
    if mask is not None:
        w[mask] *= 8
    return QuantLinear.from_quantized(quantize_weight(w, spec, outlier_mask=mask), torch.randn(out_f, generator=gen))


@needs_ext
@pytest.mark.parametrize("case", ["packed-meta8-csr", "packed-meta8-partial", "packed-fp16-block", "int4pack-csr",
                                  "int4pack-plain"])
def test_fused_rows_equal_their_parts_and_share_their_memory(case):
    path = case.split("-")[0]
    if path == "int4pack" and not int4pack_available():
        pytest.skip("no int4pack kernel in this PyTorch")
    bits = 4 if path == "int4pack" else 3
    spec = LayerSpec(grid="rtn", bits=bits, group_size=64, quant_meta="meta8" in case,
                     outlier_format="block" if "block" in case else "csr")
    ratio = 0.0 if "plain" in case else 0.02
    rows = (128, 64, 64) if path == "int4pack" else (64, 128, 64)  # meta8: 64 x 2 groups = one meta group
    width = 128
    if "partial" in case:  # as SmolLM2's q/k/v: 9 groups a row, so the parts end inside 128-value meta groups
        rows, width = (64, 32, 48), 576  # 576 and 288 scales: the fused layer decodes meta groups of 32
    dtype = torch.bfloat16 if path == "int4pack" else torch.float32
    parts = [FastQuantLinear.from_quant_linear(_quant(n, width, spec, seed=i, outliers=ratio if i != 1 else 0.0),
                                               dtype=dtype, path=path) for i, n in enumerate(rows)]
    x = torch.randn(3, width, generator=torch.Generator().manual_seed(9)).to(dtype)
    with torch.inference_mode():
        before = [p(x) for p in parts]
        fused = fuse_rows(parts)
        assert fused is not None and fused.path == path and fused.out_features == sum(rows)
        assert fused.meta_group == (32 if "partial" in case else 128 if "meta8" in case else 0)
        torch.testing.assert_close(fused(x), torch.cat(before, -1), rtol=0, atol=0)
        for part, y in zip(parts, before, strict=True):  # the parts compute as before, on views of the fused codes
            torch.testing.assert_close(part(x), y, rtol=0, atol=0)
    big = "packed" if path == "int4pack" else "codes"
    base = getattr(fused, big).untyped_storage().data_ptr()
    assert all(getattr(p, big).untyped_storage().data_ptr() == base for p in parts)


@needs_ext
def test_rows_that_cannot_stack_are_not_fused():
    spec = LayerSpec(grid="rtn", bits=3, group_size=64, quant_meta=True)
    # 8-bit metadata of 4 rows x 2 groups: sub-groups of 8 entries (below MIN_FUSED_META) would be needed
    parts = [FastQuantLinear.from_quant_linear(_quant(4, 128, spec, seed=i), path="packed") for i in range(2)]
    assert fuse_rows(parts) is None
    other = FastQuantLinear.from_quant_linear(_quant(64, 128, LayerSpec(grid="rtn", bits=4, group_size=64), 3),
                                              path="packed")
    assert fuse_rows([parts[0], other]) is None  # different specs
    assert fuse_rows([nn.Linear(8, 4), nn.Linear(6, 4)]) is None  # different inputs


def test_unsupported_models_are_refused_in_one_line_and_auto_falls_back():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    assert "gpt2" in unsupported_reason(model)
    with pytest.raises(LeanDecodeError, match="cannot run this model: model type 'gpt2'"):
        LeanDecoder(model)
    with pytest.raises(LeanDecodeError):
        generator(model, "lean")
    assert generator(model, "auto")[1] == "transformers"
    llama = make_tiny_llama()
    assert unsupported_reason(llama) is None and generator(llama)[1] == "lean"


def test_measure_speed_and_the_cli_name_the_decoder(tiny_llama, data_dir, capsys):
    model, tok = load_model(str(tiny_llama))
    ways = {d: measure_speed(model, tok, prompt_tokens=16, new_tokens=6, text="abc " * 50, decoder=d)
            for d in ("lean", "transformers")}
    assert ways["lean"].decoder == "lean" and ways["transformers"].decoder == "transformers"
    assert ways["lean"].generated == ways["transformers"].generated  # fp32: the same greedy tokens
    assert main(["bench-speed", str(tiny_llama), "--prompt-tokens", "16", "--new-tokens", "4", "--dtype", "float32",
                 "--decoder", "transformers", "--data-dir", str(data_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decoder"] == "transformers"
    assert main(["generate", str(tiny_llama), "hello", "--max-new-tokens", "4", "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["decoder"] == "lean"


@needs_ext
def test_a_quantized_head_stays_close_and_needs_the_lean_path(tiny_llama, capsys):
    model = make_tiny_llama()
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = LeanDecoder(model, max_len=20).forward(ids, last_only=False)
        errors = {}
        for bits in (8, 4):
            dec = LeanDecoder(model, max_len=20, head_bits=bits)
            assert isinstance(dec.head, FastQuantLinear) and dec.head.spec.bits == bits
            errors[bits] = ((dec.forward(ids, last_only=False) - ref).norm() / ref.norm()).item()
    assert 0 < errors[8] < 0.01 < errors[4] < 0.2  # RTN error: 8 bits ~16x smaller than 4 bits
    with pytest.raises(LeanDecodeError, match="head bits must be one of"):
        LeanDecoder(model, head_bits=3)
    with pytest.raises(LeanDecodeError, match="needs the lean decode path"):
        generator(model, "transformers", head_bits=8)
    assert main(["bench-speed", str(tiny_llama), "--prompt-tokens", "8", "--new-tokens", "3", "--head-bits", "8",
                 "--decoder", "transformers"]) == 2
    assert "needs the lean decode path" in capsys.readouterr().err


@needs_ext
def test_act8_decode_stays_close_and_leaves_the_model_exact(tmp_path, tiny_llama):
    """LeanDecoder(act8=True) rounds the packed layers' inputs to int8 per block: logits move a little (as a
    llama.cpp K-quant's do), the greedy tokens of the first steps agree, and the model's own layers stay exact."""
    model, tok = load_model(str(tiny_llama))
    config = QuantConfig(default=LayerSpec(grid="hqq", bits=3, group_size=64, quant_meta=True))
    save_quantized(model, tok, tmp_path / "q", config, quantize_model(model, config, progress=False))
    fast, _ = load_model(str(tmp_path / "q"))
    convert_to_fast(fast, dtype=torch.float32)
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        exact = LeanDecoder(fast, max_len=24)
        exact.forward(ids[:16])
        ref = torch.cat([exact.forward(ids[i:i + 1]) for i in range(16, 24)])
        rounded = LeanDecoder(fast, max_len=24, act8=True)
        rounded.forward(ids[:16])
        got = torch.cat([rounded.forward(ids[i:i + 1]) for i in range(16, 24)])
        assert not any(m.act8 for m in fast.modules() if isinstance(m, FastQuantLinear))
        again = LeanDecoder(fast, max_len=24)
        again.forward(ids[:16])
        torch.testing.assert_close(again.forward(ids[16:17]), ref[:1], rtol=0, atol=0)
    relative = ((got - ref).norm() / ref.norm()).item()
    assert 0 < relative < 0.05, relative
    assert LeanDecoder(fast, max_len=40, act8=True).generate(ids[None, :20], 6)[0][:3] == \
        LeanDecoder(fast, max_len=40).generate(ids[None, :20], 6)[0][:3]
