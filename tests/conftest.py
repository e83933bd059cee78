import os
from pathlib import Path

import pytest
import torch

from bench.tiny_model import save_tiny_llama

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


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """The tiny model (``bench.tiny_model``: 2-layer random LLaMA, hidden 96, tied, byte tokenizer) as a directory."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return path


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
