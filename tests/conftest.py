import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR}")
    return DATA_DIR


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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """:func:`make_tiny_llama` with a byte tokenizer, saved as a Hugging Face model directory."""
    model = make_tiny_llama()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
