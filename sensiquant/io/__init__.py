"""Models and checkpoints in and out: hub ids, local directories, GGUF files, the built-in aliases, and
sensiquant's own checkpoints (safetensors + JSON)."""

from .checkpoint import load_quantized, read_manifest, save_quantized
from .models import DEFAULT_MODEL, is_checkpoint, load_model, load_tokenizer, resolve_model, smollm2_gguf_path
from .safetensors import mmap_safetensors

__all__ = ["DEFAULT_MODEL", "is_checkpoint", "load_model", "load_quantized", "load_tokenizer", "mmap_safetensors",
           "read_manifest", "resolve_model", "save_quantized", "smollm2_gguf_path"]
