"""Numerics of running a model in a low-precision dtype on the CPU: attention scores in fp32 (faster there, and more
exact) and an fp32 output head (bf16 logits round near-tied choices)."""

from __future__ import annotations

import torch


def float32_head(model):
    """Keep the output projection in float32 when the rest of the model runs in a low-precision dtype.

    Logits of ~20 in bfloat16 are rounded to steps of 0.125, which is enough to flip near-tied choices when
    continuation log-likelihoods are summed; an fp32 head costs one fp32 matmul per token. Tied embeddings are
    untied for this (the input embedding stays in the low dtype).
    """
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype == torch.float32:
        return model
    head.weight = torch.nn.Parameter(head.weight.detach().float().clone(), requires_grad=False)
    if getattr(head, "bias", None) is not None:
        head.bias = torch.nn.Parameter(head.bias.detach().float().clone(), requires_grad=False)
    if hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False
    head.register_forward_pre_hook(lambda module, args: tuple(a.float() if torch.is_tensor(a) else a for a in args))
    return model


FP32_SDPA = "sensiquant_fp32_sdpa"


def _fp32_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with bf16/fp16 inputs computed in fp32 on the CPU.

    PyTorch's CPU flash-attention kernel is slow for bf16 without AMX (measured in BENCHMARKS.md, "Speed"); the
    upcast is also more exact."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    if query.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(dtype), weights


def use_fp32_attention(model) -> bool:
    """Run ``model``'s attention through :func:`_fp32_sdpa` when it uses SDPA; returns whether it was switched.

    Only the attention scores and softmax change dtype; the weights, KV cache and everything else stay as they are."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(FP32_SDPA, _fp32_sdpa)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)
    model.set_attn_implementation(FP32_SDPA)
    return True
