"""sensiquant checkpoints through plain transformers: ``AutoModelForCausalLM.from_pretrained(checkpoint_dir)``.

A checkpoint's config.json says ``quant_method: "sensiquant"``; :func:`register` (run by ``import sensiquant`` as
soon as transformers' quantizer registry is imported, see :mod:`sensiquant.io.hf_hook`) maps that name to
:class:`SensiquantConfig` and :class:`SensiquantHfQuantizer`. The quantizer runs sensiquant's own checks and layer
construction (:mod:`sensiquant.io.checkpoint`) inside from_pretrained:

- before the weights load: every check of ``load_quantized`` that reads no tensor data (manifest schema and
  checksum, safetensors header against the manifest, every layer's tensors against its spec and the accounting,
  the sha256 of config and tokenizer files), the stored tensors against the model, the outlier indices; then each
  quantized linear becomes a QuantLinear, and every other tensor of the model must be in the file (none is left to
  random initialisation);
- transformers then loads the file into the model; QuantLinear's tensors keep their stored dtypes;
- after: every quantized layer holds its tensors as stored, and ``save_pretrained`` writes a sensiquant checkpoint.

Without ``import sensiquant`` the same from_pretrained stops with an error naming sensiquant (the weights guard of
:data:`~sensiquant.io.checkpoint.WEIGHTS_GUARD`), instead of building the packed layers as random weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import SensiquantError
from .checkpoint import (
    FORMAT_VERSION,
    MANIFEST,
    QUANT_METHOD,
    WEIGHTS,
    WEIGHTS_GUARD,
    _check_complete,
    _check_loaded,
    _finish_loaded,
    _inspect,
    _install_quant_linears,
)


class SensiquantConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a sensiquant checkpoint. It only points at the manifest: the per-layer specs,
    shapes and checksums live there and are checked on load."""

    def __init__(self, format_version: int = FORMAT_VERSION, manifest: str = MANIFEST, **kwargs):
        if manifest != MANIFEST:
            raise SensiquantError(f"quantization_config: manifest {manifest!r} is not {MANIFEST}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.manifest = manifest
        self.load_with = kwargs.get("load_with", "import sensiquant; AutoModelForCausalLM.from_pretrained(path)")


class SensiquantHfQuantizer(HfQuantizer):
    """Loads a sensiquant checkpoint into QuantLinear layers, checked as :func:`~sensiquant.load_quantized` checks.
    Quantizing on load is not offered (``sensiquant.quantize`` does that), hence ``requires_calibration``."""

    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checked = None

    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise SensiquantError("sensiquant checkpoints do not load with disk offload (device_map 'disk')")

    def update_attn_implementation(self, config):
        # the one hook that sees the config before transformers resolves the weights file: undo the weights guard
        if getattr(config, "transformers_weights", None) == WEIGHTS_GUARD:
            config.transformers_weights = WEIGHTS
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        files = [Path(f) for f in checkpoint_files or []]
        if len(files) != 1 or files[0].name != WEIGHTS:
            raise SensiquantError(f"a sensiquant checkpoint loads from one {WEIGHTS}, transformers found "
                                  f"{[str(f) for f in files]}")
        if not (files[0].parent / MANIFEST).is_file():
            raise SensiquantError(f"no {MANIFEST} beside {files[0]}: sensiquant checkpoints load from a local "
                                  "directory holding the whole checkpoint (download a hub repository first)")
        self.checked = _inspect(files[0].parent)
        with torch.device("cpu"):  # from_pretrained builds the model under a meta-device default; the checks compute
            _install_quant_linears(model, self.checked)
        _check_complete(model, self.checked, tied=set(getattr(model, "all_tied_weights_keys", None) or {}))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _check_loaded(model, self.checked)
        _finish_loaded(model, self.checked)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Map quant_method "sensiquant" to sensiquant's config and quantizer in transformers (once)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SensiquantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SensiquantHfQuantizer)
