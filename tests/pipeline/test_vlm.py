"""Any architecture: GWQ quantizes both towers of a tiny random Qwen2-VL and the model still runs."""

import pytest
import torch

from sensiquant.format import LayerSpec
from sensiquant.methods import OutlierConfig
from sensiquant.pipeline import QuantConfig, quantize_model
from sensiquant.runtime import QuantLinear

IMAGE, VISION_START = 299, 297


@pytest.fixture
def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, eos_token_id=0),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, in_channels=3, temporal_patch_size=2),
        image_token_id=IMAGE, video_token_id=298, vision_start_token_id=VISION_START)
    return Qwen2VLForConditionalGeneration(config).eval()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    # one 16x16 image: a 4x4 grid of patches, merged 2x2 into 4 image tokens
    ids = torch.cat([torch.tensor([1, VISION_START] + [IMAGE] * 4), torch.randint(3, 290, (20,), generator=g)])[None]
    return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 4 * 4, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == IMAGE).long()}


def test_gradients_reach_both_towers(tiny_qwen2_vl):
    from sensiquant.calib import gradient_statistics
    from sensiquant.runtime.walk import find_linears

    layers = find_linears(tiny_qwen2_vl, ["lm_head"])
    stats = gradient_statistics(tiny_qwen2_vl, [_batch(1)], layers, progress=False)
    assert any(".visual." in n for n in layers)
    assert all(float(s.float().abs().sum()) > 0 for s in stats.abs_sum.values())


def test_gwq_quantizes_vision_and_language_towers(tiny_qwen2_vl):
    model = tiny_qwen2_vl
    batch = _batch(0)
    with torch.inference_mode():
        before = model(**batch).logits
    config = QuantConfig(default=LayerSpec(grid="rtn", bits=4, group_size=32, outlier_ratio=0.01),
                         outliers=OutlierConfig(saliency="grad"))
    report = quantize_model(model, config, None, progress=False, calib_batches=[_batch(1), _batch(2)])
    vision = [n for n in report.layers if ".visual." in n]
    language = [n for n in report.layers if ".language_model." in n]
    assert len(vision) == 2 * 4 + 2  # qkv, proj, fc1, fc2 per block + the patch merger's two linears
    assert len(language) == 2 * 7
    assert "lm_head" not in report.layers
    assert all(report.layers[n].n_outliers == round(0.01 * model.get_submodule(n).in_features
                                                   * model.get_submodule(n).out_features) for n in vision + language)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in vision + language)
    with torch.inference_mode():
        after = model(**batch).logits
    assert torch.isfinite(after).all()
    rel = float((after - before).norm() / before.norm())
    assert 0 < rel < 0.2  # quantized, and still close to the original at 4 bits
