"""A lean batch-1 decode path for plain decoders (LLaMA, Qwen2, Mistral): a static KV cache and one short loop.

transformers' generic forward costs more than the quantized matmuls at batch 1 on the CPU: a dynamic cache that
concatenates keys and values on every step, mask construction, hooks, and a module call per small op. LeanDecoder
reads the model's own modules once (norm weights, projections: ``nn.Linear``, ``QuantLinear`` or
``FastQuantLinear`` alike, rotary tables) and runs each step as a fixed sequence of tensor ops:

* keys and values go into preallocated tensors in the model dtype (as transformers' cache holds them; at batch 1
  attention reads the whole cache every step, so a bf16 cache halves the bytes it reads), written in place;
  nothing is concatenated; the scores (a product in the cache dtype) are scaled and soft-maxed in fp32;
* the query, key and value projections of a layer run as one fused product when the three layers allow it
  (:func:`sensiquant.runtime.fast.fuse_rows`), and so do the gate and up projections;
* the rotary tables are computed once for the whole cache length;
* the packed kernels are called directly (:meth:`~sensiquant.runtime.fast.FastQuantLinear.decode_fn`), not
  through the module call;
* optionally (``head_bits``) the output head runs as an RTN-quantized copy (8 or 4 bits, groups of 64): at batch 1
  the vocabulary-sized head is the largest single matmul of a small model; the embedding lookup keeps the original;
* optionally (``act8``) the packed 2-4-bit layers round their input to int8 per block of 32 and sum the code
  products in integers (:attr:`FastQuantLinear.act8`, as llama.cpp's K-quants do with their activations).

Numerics follow transformers' (RMSNorm computed in fp32, residual stream and cache in the model dtype); rotary runs in
fp32, so logits equal transformers' up to the rounding of the model dtype (the suite checks fp32 models to 1e-4
and greedy tokens of bf16 checkpoints). Architectures beyond the plain decoder raise :class:`LeanDecodeError`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SensiquantError

ARCHITECTURES = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")  # tables that do not depend on the sequence length
HEAD_BITS = (8, 4)
HEAD_GROUP = 64
PROJECTIONS = ("qkv", "q", "k", "v", "o", "gate_up", "gate", "up", "down")


class LeanDecodeError(SensiquantError):
    """The model is not a plain decoder the lean path runs; use transformers' generate instead."""


def _rope_type(rotary) -> str:
    return str(getattr(rotary, "rope_type", "default"))


def unsupported_reason(model) -> str | None:
    """Why :class:`LeanDecoder` cannot run ``model`` (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"model type {model_type!r} (the lean decode path runs {', '.join(ARCHITECTURES)})"
    if getattr(config, "use_sliding_window", False) or getattr(config, "sliding_window", None) and \
            model_type == "mistral":
        return "sliding-window attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no decoder layers or rotary embedding where transformers puts them"
    if _rope_type(inner.rotary_emb) not in ROPE_TYPES:
        return f"rope type {_rope_type(inner.rotary_emb)!r}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    return None


def quantized_head(head: nn.Module, bits: int, dtype: torch.dtype) -> nn.Module:
    """An RTN copy of the output head at ``bits`` (groups of 64) on the fast kernels, computing in ``dtype``."""
    from ..format import LayerSpec
    from ..methods import quantize_weight
    from .fast import FastQuantLinear
    from .qlinear import QuantLinear

    if not isinstance(head, nn.Linear):
        raise LeanDecodeError(f"only a plain linear head can be quantized, got {type(head).__name__}")
    spec = LayerSpec(grid="rtn", bits=bits, group_size=HEAD_GROUP)
    with torch.no_grad():
        qlinear = QuantLinear.from_quantized(quantize_weight(head.weight.detach().float(), spec), head.bias)
    return FastQuantLinear.from_quant_linear(qlinear, dtype=dtype)


def _direct(layer: nn.Module | None, act8: bool):
    """``layer`` as the callable the decode loop runs: a packed layer's kernel directly (with int8 inputs when
    ``act8``; the layer itself is not changed), a plain linear as ``F.linear``, anything else as the module."""
    from .fast import FastQuantLinear

    if layer is None:
        return None
    if isinstance(layer, FastQuantLinear):
        return layer.decode_fn(act8=act8 or None)
    if type(layer) is nn.Linear:
        weight, bias = layer.weight, layer.bias
        return lambda x: F.linear(x, weight, bias)
    return layer


class LeanDecoder:
    """Greedy batch-1 decoding of ``model`` with a static KV cache of ``max_len`` positions.

    ``generate(ids, new_tokens)`` has the contract of :func:`sensiquant.runtime.greedy_generate`. The decoder holds
    references to the model's weights; fused projections take the place of their parts, which become views of them
    (:func:`~sensiquant.runtime.fast.fuse_rows`), so the model runs on unchanged and nothing is held twice."""

    def __init__(self, model: nn.Module, max_len: int = 2048, fuse: bool = True, head_bits: int | None = None,
                 act8: bool = False):
        reason = unsupported_reason(model)
        if reason is not None:
            raise LeanDecodeError(f"the lean decode path cannot run this model: {reason}")
        if head_bits is not None and head_bits not in HEAD_BITS:
            raise LeanDecodeError(f"head bits must be one of {HEAD_BITS}, got {head_bits}")
        from .fast import fuse_rows

        config, inner = model.config, model.model
        self.model, self.max_len = model, max_len
        self.dtype = inner.embed_tokens.weight.dtype
        self.embed = inner.embed_tokens.weight
        self.head = model.lm_head if head_bits is None else quantized_head(model.lm_head, head_bits, self.dtype)
        self.final_norm = (inner.norm.weight, inner.norm.variance_epsilon)
        attn0 = inner.layers[0].self_attn
        self.head_dim = attn0.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.scaling = attn0.scaling
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = fuse_rows([a.q_proj, a.k_proj, a.v_proj]) if fuse else None
            gate_up = fuse_rows([m.gate_proj, m.up_proj]) if fuse else None
            self.layers.append({
                "norm1": (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                "norm2": (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                "qkv": qkv, "q": a.q_proj, "k": a.k_proj, "v": a.v_proj, "o": a.o_proj,
                "gate_up": gate_up, "gate": m.gate_proj, "up": m.up_proj, "down": m.down_proj})
        self.fused = sum(layer["qkv"] is not None for layer in self.layers) + \
            sum(layer["gate_up"] is not None for layer in self.layers)
        self.act8 = act8
        # what forward calls: the same products as direct kernel calls
        self.calls = [{key: _direct(layer[key], act8) for key in PROJECTIONS} for layer in self.layers]
        self.head_call = _direct(self.head, act8)
        device = self.embed.device
        positions = torch.arange(max_len, device=device).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32, device=device)
        cos, sin = inner.rotary_emb(probe, positions)
        cos, sin = cos[0].float(), sin[0].float()  # (max_len, head_dim)
        half = self.head_dim // 2  # rotate_half(x) * sin == flip(x as (2, half)) * sin with its first half negated
        self.cos = cos.view(max_len, 1, 2, half)
        self.sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).view(max_len, 1, 2, half)
        shape = (len(self.layers), self.n_kv, max_len, self.head_dim)
        self.keys = torch.zeros(shape, dtype=self.dtype, device=device)
        self.values = torch.zeros(shape, dtype=self.dtype, device=device)
        self.layer_cache = list(zip(self.keys.unbind(0), self.values.unbind(0), strict=True))  # views, made once
        self.length = 0

    # -- one forward ----------------------------------------------------------------------------------------------
    def _norm(self, h: torch.Tensor, norm) -> torch.Tensor:
        """RMSNorm in one op (computed in fp32 inside, rounded once: transformers rounds before the weight too)."""
        weight, eps = norm
        return F.rms_norm(h, (h.shape[-1],), weight, eps)

    def _rope(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotary embedding of x (T, heads, head_dim) in fp32 at positions start..start+T-1: x * cos +
        rotate_half(x) * sin, with rotate_half as a flip of the two halves against a sign-folded sin (the same
        products and sum, in four ops instead of seven)."""
        t, heads, d = x.shape
        x = x.view(t, heads, 2, d // 2)
        end = start + t
        return (x * self.cos[start:end] + x.flip(2) * self.sin_signed[start:end]).view(t, heads, d)

    def forward(self, ids: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Logits (T or 1, vocab) of the 1-D ``ids`` appended at the current cache position."""
        t = ids.shape[0]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise LeanDecodeError(f"the static cache holds {self.max_len} positions; {end} were asked for")
        nq, nkv, d = self.n_heads, self.n_kv, self.head_dim
        h = self.embed[ids]  # (T, hidden) in the model dtype
        for i, (layer, call) in enumerate(zip(self.layers, self.calls, strict=True)):
            x = self._norm(h, layer["norm1"])
            if call["qkv"] is not None:
                qkv = call["qkv"](x).float().view(t, nq + 2 * nkv, d)
                qk, v = self._rope(qkv[:, :nq + nkv], start), qkv[:, nq + nkv:]
                q, k = qk[:, :nq], qk[:, nq:]
            else:
                q = self._rope(call["q"](x).float().view(t, nq, d), start)
                k = self._rope(call["k"](x).float().view(t, nkv, d), start)
                v = call["v"](x).float().view(t, nkv, d)
            layer_keys, layer_values = self.layer_cache[i]
            layer_keys[:, start:end] = k.transpose(0, 1)
            layer_values[:, start:end] = v.transpose(0, 1)
            keys, values = layer_keys[:, :end], layer_values[:, :end]
            q = q.to(keys.dtype)
            if t == 1:  # one query: three small batched products beat SDPA's dispatch (query head j reads j // group)
                scores = torch.matmul(q.view(nkv, nq // nkv, d), keys.transpose(1, 2)).float()
                probs = torch.softmax(scores.mul_(self.scaling), dim=-1).to(values.dtype)
                attn = torch.matmul(probs, values).view(1, nq * d)
            else:
                attn = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys[None], values[None],
                                                      is_causal=start == 0,
                                                      attn_mask=self._mask(t, start) if start else None,
                                                      scale=self.scaling, enable_gqa=nkv != nq)
                attn = attn[0].transpose(0, 1).reshape(t, nq * d)
            h = h + call["o"](attn.to(h.dtype))
            x = self._norm(h, layer["norm2"])
            if call["gate_up"] is not None:
                gate, up = call["gate_up"](x).chunk(2, dim=-1)
            else:
                gate, up = call["gate"](x), call["up"](x)
            h = h + call["down"](F.silu(gate) * up)
        self.length = end
        if last_only:
            h = h[-1:]
        return self.head_call(self._norm(h, self.final_norm))

    def _mask(self, t: int, start: int) -> torch.Tensor:
        device = self.keys.device
        rows = torch.arange(start, start + t, device=device)[:, None]
        return torch.arange(start + t, device=device)[None, :] <= rows

    def reset(self) -> None:
        self.length = 0

    # -- generation -----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float, float]:
        """Greedy tokens after ``input_ids`` (1, T); returns (tokens, prefill seconds, decode seconds)."""
        if input_ids.shape[0] != 1:
            raise LeanDecodeError(f"the lean decode path runs batch 1, got a batch of {input_ids.shape[0]}")
        self.reset()
        start = time.perf_counter()
        logits = self.forward(input_ids[0])
        prefill = time.perf_counter() - start
        token = logits[-1].argmax()
        tokens = [int(token)]
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.forward(token.view(1))[-1].argmax()
            tokens.append(int(token))
        return tokens, prefill, time.perf_counter() - start
