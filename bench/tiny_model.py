"""The one tiny model of the test suite and the smoke benchmarks: a seeded random LLaMA with a byte-level tokenizer
(no download). For unit tests and smoke runs only, never for quality claims."""

from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer():
    """A real byte-level tokenizer with 256 tokens and no merges (no download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=sorted(alphabet)[0])


def make_tiny_llama(n_layers: int = 2, hidden_size: int = 96, intermediate_size: int = 200, tied: bool = True,
                    seed: int = 0):
    """The one tiny model of the suite: a random LLaMA with a 256-token vocabulary (byte tokenizer), seeded.
    Defaults: 2 layers, hidden 96 so that group 64 leaves a tail group, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


def save_tiny_llama(path: Path, **kwargs) -> Path:
    """:func:`make_tiny_llama` (``kwargs``) and the byte tokenizer, saved as a Hugging Face model directory."""
    make_tiny_llama(**kwargs).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path
