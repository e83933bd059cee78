"""The public Python API: one function per job."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .alloc.plan import Plan
from .checkpoint import save_quantized
from .config import LayerSpec, QuantConfig
from .data import load_text
from .eval.perplexity import PerplexityResult, perplexity
from .gwq import DEFAULT_SPEC as GWQ_DEFAULT_SPEC
from .gwq import GWQConfig, gwq_quantize
from .models import load_model
from .planning import PlanConfig, apply_plan, make_plan
from .quantize import quantize_model


def quantize(model_name: str, config: QuantConfig | LayerSpec | None = None, out_dir: str | Path | None = None,
             progress: bool = True, trust_remote_code: bool = False, gwq: GWQConfig | None = None):
    """Load ``model_name``, quantize it (GWQ when ``gwq`` is given), optionally save it.

    Without ``config``: 4-bit g64 HQQ, or GWQ's best measured grid (:data:`sensiquant.gwq.DEFAULT_SPEC`) with ``gwq``.
    Returns (model, tokenizer, report).
    """
    if config is None:
        config = QuantConfig() if gwq is None else QuantConfig(default=GWQ_DEFAULT_SPEC)
    elif isinstance(config, LayerSpec):
        config = QuantConfig(default=config)
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    if gwq is None:
        report = quantize_model(model, config, progress=progress)
    else:
        report, stats = gwq_quantize(model, tokenizer, config, gwq, progress=progress)
        report.extra = {"gwq": gwq.to_dict(), "gwq_stats": dataclasses.asdict(stats)}
    if out_dir is not None:
        save_quantized(model, tokenizer, out_dir, config, report)
    return model, tokenizer, report


def plan(model_name: str, config: PlanConfig, progress: bool = True, trust_remote_code: bool = False) -> Plan:
    """Load ``model_name`` and make a per-layer plan for ``config.budget`` (see :mod:`sensiquant.planning`)."""
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    return make_plan(model, tokenizer, config, progress, model_name=str(model_name))


def quantize_with_plan(model_name: str, plan_or_config: Plan | PlanConfig, out_dir: str | Path | None = None,
                       progress: bool = True, trust_remote_code: bool = False):
    """Load ``model_name``, plan it (when given a PlanConfig) and quantize it as planned; optionally save it
    (the plan is written next to the checkpoint as plan.json). Returns (model, tokenizer, report, plan)."""
    model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
    the_plan = plan_or_config
    if isinstance(plan_or_config, PlanConfig):
        the_plan = make_plan(model, tokenizer, plan_or_config, progress, model_name=str(model_name))
    report, config = apply_plan(model, tokenizer, the_plan, progress)
    if out_dir is not None:
        save_quantized(model, tokenizer, out_dir, config, report)
        the_plan.save(Path(out_dir) / "plan.json")
    return model, tokenizer, report, the_plan


def evaluate_perplexity(model, tokenizer, datasets=("wikitext2",), seqlen: int = 2048,
                        max_windows: int | None = None, data_dir: str | os.PathLike | None = None,
                        progress: bool = True) -> dict[str, PerplexityResult]:
    """Perplexity on each named set or text file (test split for wikitext2)."""
    return {name: perplexity(model, tokenizer, load_text(name, "test", data_dir), seqlen, max_windows, progress,
                             desc=f"ppl {Path(name).name}")
            for name in datasets}


def model_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of everything the model stores: unique parameters and persistent buffers (tied weights once)."""
    seen, total = set(), 0
    for value in model.state_dict().values():
        if value.data_ptr() in seen and value.numel():
            continue
        seen.add(value.data_ptr())
        total += value.numel() * value.element_size()
    return total
