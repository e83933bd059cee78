"""Models and checkpoints in and out: hub ids, local directories, GGUF files, the built-in aliases, and
sensiquant's own checkpoints (safetensors + JSON, written atomically, checked on every load)."""

from .checkpoint import load_quantized, read_manifest, save_quantized, verify_checkpoint
from .compressed_tensors import export_compressed_tensors
from .gguf_export import export_gguf
from .models import (
    DEFAULT_MODEL,
    is_checkpoint,
    load_model,
    load_tokenizer,
    refuse_incomplete_checkpoint,
    resolve_model,
    smollm2_gguf_path,
)
from .safetensors import mmap_safetensors, read_safetensors_header

__all__ = ["DEFAULT_MODEL", "export_compressed_tensors", "export_gguf", "is_checkpoint", "load_model",
           "load_quantized", "load_tokenizer", "mmap_safetensors", "read_manifest", "read_safetensors_header",
           "refuse_incomplete_checkpoint", "resolve_model", "save_quantized", "smollm2_gguf_path", "verify_checkpoint"]
