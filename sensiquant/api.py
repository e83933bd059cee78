"""The public Python API: one function per job."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .calib.distributed import init_from_env, is_main, world_size
from .data import load_text
from .errors import SensiquantError
from .eval.perplexity import SEQLEN, PerplexityResult, perplexity
from .format.spec import LayerSpec
from .io import load_model, save_quantized
from .methods.gptq import GPTQConfig
from .methods.round import RoundConfig
from .methods.signround import SignRoundConfig
from .pipeline import DEFAULT_SKIP, QuantConfig, QuantReport, quantize_model, recipe
from .pipeline.resume import ResumeState, discard, resume_dir
from .planning import Plan, PlanCache, PlanConfig, apply_plan, make_plan, plan_quant_config
from .runtime.device import DEFAULT_DEVICE, model_device, resolve_device
from .runtime.walk import find_linears, model_size_bytes

DEFAULT_RECIPE = "hqq"


def source_path(model_name: str) -> Path | None:
    """The local directory a model is read from (a GGUF file's folder), or None for a hub id."""
    from .io.models import resolve_model

    path = Path(resolve_model(str(model_name))).expanduser()
    if not path.exists():
        return None
    return (path.parent if path.is_file() else path).resolve()


def check_out_dir(out_dir: str | os.PathLike, model_name: str | None = None, overwrite: bool = False) -> Path:
    """Refuse, before any work, an output directory that would destroy the input or other files, or that cannot be
    written: the model's own directory (or one holding it), a file or a path under a file, a non-empty directory
    unless ``overwrite``, an unwritable place. Returns the resolved path."""
    out = Path(out_dir).expanduser().resolve()
    source = source_path(model_name) if model_name is not None else None
    if source is not None and (out == source or out in source.parents):
        raise SensiquantError(f"--out {out_dir} would overwrite the model being read ({source}); choose another "
                              "directory")
    if out.exists() and not out.is_dir():
        raise SensiquantError(f"--out {out_dir} is a file, not a directory")
    ancestor = out
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SensiquantError(f"--out {out_dir} lies under {ancestor}, which is a file")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SensiquantError(f"--out {out_dir} is not empty: pass --overwrite to replace it")
        if not (out / "sensiquant.json").is_file():
            raise SensiquantError(f"--out {out_dir} is not a sensiquant checkpoint: refusing to replace its files, "
                                  "even with --overwrite")
    try:  # a real write, since permission bits say nothing for root and nothing about read-only mounts
        fd, probe = tempfile.mkstemp(prefix=".sensiquant-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SensiquantError(f"--out {out_dir} cannot be written ({ancestor}: {exc.strerror})") from None
    return out


def check_not_a_checkpoint(model_name: str) -> None:
    """Quantizing or planning an already quantized checkpoint is refused (its layers are no longer nn.Linear)."""
    from .io.models import is_checkpoint

    if is_checkpoint(model_name):
        raise SensiquantError(f"{model_name} is already a sensiquant checkpoint: quantize the original model")


def as_quant_config(config: QuantConfig | LayerSpec | str | None) -> QuantConfig:
    """A QuantConfig from a QuantConfig, a LayerSpec (round to nearest on its grid), a recipe name, or None (the
    default recipe, HQQ 4-bit g64)."""
    if config is None:
        return recipe(DEFAULT_RECIPE)
    if isinstance(config, str):
        return recipe(config)
    if isinstance(config, LayerSpec):
        return QuantConfig(default=config)
    if isinstance(config, QuantConfig):
        return config
    raise SensiquantError(f"expected a QuantConfig, LayerSpec or recipe name, got {type(config).__name__}")


def quantize(model_name: str, config: QuantConfig | LayerSpec | str | None = None, out_dir: str | Path | None = None,
             progress: bool = True, trust_remote_code: bool = False, calib_batches: list[dict] | None = None,
             overwrite: bool = False, evaluate=None, resume: bool = True, device: str | None = DEFAULT_DEVICE,
             stream: bool = False) -> tuple[torch.nn.Module, object, QuantReport]:
    """Load ``model_name``, quantize it as ``config`` says (see :func:`as_quant_config`), optionally save it
    (``out_dir`` is checked before any work, see :func:`check_out_dir`). ``evaluate(model, tokenizer)``, if given,
    runs on the quantized model before it is saved, and the perplexities it returns ({text name:
    PerplexityResult}) go on the checkpoint's model card. With ``out_dir`` and ``resume``, a calibrated run keeps
    its finished work beside ``out_dir`` and picks up what an interrupted run of the same job kept
    (:mod:`sensiquant.pipeline.resume`); ``resume=False`` starts afresh. ``device`` ("auto": a GPU where there is
    one, "cpu", "cuda", "cuda:N") is where the model and every statistic live while quantizing. Under torchrun the
    ranks share the calibration windows (:mod:`sensiquant.calib.distributed`) and rank 0 writes. With ``stream``
    only one decoder block's weights are in memory at a time (:mod:`sensiquant.pipeline.streamed`; a local
    model: a safetensors folder or a GGUF file). Returns (model, tokenizer, report)."""
    config = as_quant_config(config)
    check_not_a_checkpoint(model_name)
    init_from_env()
    progress = progress and is_main()
    target = resolve_device(device)
    if out_dir is not None:
        check_out_dir(out_dir, model_name, overwrite)
    if stream:
        from .io.streamed import open_streamed
        from .pipeline.streamed import quantize_streamed

        streamed = open_streamed(model_name, trust_remote_code, progress, target)
        model, tokenizer = streamed.model, streamed.tokenizer
        state = _resume_state(out_dir, resume, None, config, streamed.source.fingerprint())
        report = quantize_streamed(streamed, config, tokenizer, progress, calib_batches, resume=state)
        card = _card(model_name, model, tokenizer, evaluate)  # scored block by block: the head not yet read
        streamed.load_all()
    else:
        model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
        model.to(target)
        state = _resume_state(out_dir, resume, model, config)
        report = quantize_model(model, config, tokenizer, progress, calib_batches, resume=state)
        card = _card(model_name, model, tokenizer, evaluate)
    if out_dir is not None and is_main():
        save_quantized(model, tokenizer, out_dir, config, report, card=card)
    if state is not None:
        state.remove()
    return model, tokenizer, report


def _resume_state(out_dir, resume: bool, model, config: QuantConfig, fingerprint: str | None = None
                  ) -> ResumeState | None:
    """The resume state of a run writing ``out_dir`` (None: nothing to keep, or ``resume`` is off, in which case
    what an earlier run kept is dropped); a streamed run names its model by ``fingerprint``."""
    if out_dir is None or world_size() > 1:  # several processes: not kept (yet)
        return None
    root = resume_dir(out_dir)
    if not resume or not config.calibrated:
        discard(root)
        return None
    if fingerprint is not None:
        return ResumeState.open(root, {**config.to_dict(), "streamed": True}, fingerprint=fingerprint)
    return ResumeState.open(root, config.to_dict(), find_linears(model, config.skip))


def _card(model_name: str, model, tokenizer, evaluate) -> dict:
    """The model card facts of a fresh quantization: the model's name, and what ``evaluate`` measured on it."""
    card = {"base_model": str(model_name)}
    if evaluate is not None:
        card["perplexity"] = evaluate(model, tokenizer)
    return card


def plan(model_name: str, config: PlanConfig, progress: bool = True, trust_remote_code: bool = False) -> Plan:
    """Load ``model_name`` and make a per-layer plan for ``config.budget`` (see :mod:`sensiquant.planning`)."""
    check_not_a_checkpoint(model_name)
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    return make_plan(model, tokenizer, config, progress, model_name=str(model_name))


def quantize_with_plan(model_name: str, plan_or_config: Plan | PlanConfig, out_dir: str | Path | None = None,
                       method: RoundConfig | GPTQConfig | None = None, progress: bool = True,
                       trust_remote_code: bool = False, overwrite: bool = False,
                       tuning: SignRoundConfig | None = None, evaluate=None, resume: bool = True,
                       device: str | None = DEFAULT_DEVICE):
    """Load ``model_name``, plan it (when given a PlanConfig) and quantize it as planned, with ``method`` or the
    plan's own, block-tuned when ``tuning`` is given; optionally save it (the plan is written next to the
    checkpoint as plan.json; ``evaluate``, ``resume`` and ``device`` as in :func:`quantize`; planning itself is
    redone, on the CPU). Returns (model, tokenizer, report, plan)."""
    check_not_a_checkpoint(model_name)
    init_from_env()
    progress = progress and is_main()
    target = resolve_device(device)
    if out_dir is not None:
        check_out_dir(out_dir, model_name, overwrite)
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    the_plan, cache = plan_or_config, PlanCache()
    if isinstance(plan_or_config, PlanConfig):
        the_plan = make_plan(model, tokenizer, plan_or_config, progress, model_name=str(model_name), cache=cache)
    model.to(target)
    config = plan_quant_config(model, the_plan, method, tuning)
    state = _resume_state(out_dir, resume, model, config)
    # the plan's gradient pass (on the CPU, over the windows the plan is applied with) serves the quantization too
    shared = cache if model_device(model).type == "cpu" and world_size() == 1 else None
    report, config = apply_plan(model, tokenizer, the_plan, method, progress, tuning, resume=state, cache=shared)
    card = _card(model_name, model, tokenizer, evaluate)
    if out_dir is not None and is_main():
        save_quantized(model, tokenizer, out_dir, config, report, extra_files={"plan.json": the_plan.to_json()},
                       card=card)
    if state is not None:
        state.remove()
    return model, tokenizer, report, the_plan


def evaluate_perplexity(model, tokenizer, datasets=("wikitext2",), seqlen: int = SEQLEN,
                        max_windows: int | None = None, data_dir: str | os.PathLike | None = None,
                        progress: bool = True, texts: dict[str, str] | None = None) -> dict[str, PerplexityResult]:
    """Perplexity on each named set or text file (test split for wikitext2); ``texts`` gives texts already read."""
    texts = texts if texts is not None else {name: load_text(name, "test", data_dir) for name in datasets}
    return {name: perplexity(model, tokenizer, text, seqlen, max_windows, progress, desc=f"ppl {Path(name).name}")
            for name, text in texts.items()}


def load_for_inference(name_or_path: str, dtype: str = "bfloat16", fast: bool = True, widen: bool = False,
                       trust_remote_code: bool = False):
    """(model, tokenizer, info) ready to run: weights in ``dtype``, quantized layers on the fast CPU kernels
    (unless ``fast=False``), attention scores in fp32. ``info`` names the kernels and the bytes they hold."""
    from .runtime import build_extension, convert_to_fast, extension_available, quant_weight_bytes, use_fp32_attention
    from .runtime.extension import extension_error

    torch_dtype = getattr(torch, dtype)
    model, tokenizer = load_model(name_or_path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise SensiquantError(f"{name_or_path} has no tokenizer files")
    report = getattr(model, "sensiquant_report", None)
    paths: dict[str, str] = {}
    if fast and report is not None:
        paths = convert_to_fast(model, dtype=torch_dtype, widen=widen)
    else:
        model.to(torch_dtype)
    # bf16 attention on the CPU is slow without AMX (see use_fp32_attention): scores in fp32 for every model alike
    attention = "sdpa, scores in fp32" if use_fp32_attention(model) else model.config._attn_implementation
    info = {"model": str(name_or_path), "dtype": dtype, "fast": bool(paths), "attention": attention,
            "kernels": {k: sum(1 for v in paths.values() if v == k) for k in sorted(set(paths.values()))}}
    if paths:
        info["extension"] = build_extension() if extension_available() else {"error": extension_error()}
    if report is not None:
        info["bits_per_param"] = report.bits_per_param
        info["stored_weight_bytes"] = report.quantized_bits // 8
        if paths:
            info["resident_weight_bytes"] = quant_weight_bytes(model)
    return model, tokenizer, info


__all__ = ["DEFAULT_RECIPE", "DEFAULT_SKIP", "as_quant_config", "check_not_a_checkpoint", "check_out_dir",
           "evaluate_perplexity", "load_for_inference", "model_size_bytes", "plan", "quantize", "quantize_with_plan"]
