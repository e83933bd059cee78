"""The model card (README.md) of a checkpoint: what was quantized, how, at what size, measured how well, and how to
load it. It is rendered from the manifest alone (the QuantConfig, the per-layer records, the summary and the
``card`` facts: base model and perplexities), so a checkpoint saved again carries the same card."""

from __future__ import annotations

from collections import Counter

from ..errors import SensiquantError

CARD = "README.md"


def check_card(card) -> dict:
    """The ``card`` facts of :func:`~sensiquant.io.save_quantized` as plain JSON: ``base_model`` (a name) and
    ``perplexity`` ({text name: PerplexityResult or its dict}); one SensiquantError for anything else."""
    if card is None:
        return {}
    if not isinstance(card, dict) or set(card) - {"base_model", "perplexity"}:
        raise SensiquantError(f"model card facts must be a dict with base_model and/or perplexity, got {card!r}")
    out: dict = {}
    base = card.get("base_model")
    if base is not None:
        if not isinstance(base, str) or not base.strip():
            raise SensiquantError(f"model card base_model must be a non-empty string, got {base!r}")
        out["base_model"] = base
    ppl = card.get("perplexity") or {}
    if not isinstance(ppl, dict):
        raise SensiquantError(f"model card perplexity must map text names to results, got {ppl!r}")
    results = {}
    for name, result in ppl.items():
        result = result.to_dict() if hasattr(result, "to_dict") else result
        value = result.get("ppl") if isinstance(result, dict) else None
        if not isinstance(name, str) or not isinstance(value, int | float) or isinstance(value, bool) \
                or not value > 0:  # inf (an overflowing model) is a measurement too; NaN is not
            raise SensiquantError(f"model card perplexity {name!r}: expected a result with a positive ppl, "
                                  f"got {result!r}")
        results[name] = dict(result)
    if results:
        out["perplexity"] = results
    return out


def _spec_text(spec: dict) -> str:
    group = "per-channel" if spec.get("group_size") is None else f"groups of {spec['group_size']}"
    meta = f"8-bit scales/zeros (groups of {spec.get('meta_group_size', 128)})" if spec.get("quant_meta") \
        else "FP16 scales/zeros"
    text = f"{spec['bits']}-bit codes, {group}, {spec.get('grid', 'hqq').upper()} grid, {meta}"
    ratio = spec.get("outlier_ratio", 0) or 0
    if ratio > 0:
        kind = "FP16 CSR" if spec.get("outlier_format", "csr") == "csr" else "int8 block residuals"
        text += f", {100 * ratio:.3g}% outliers as {kind}"
    return text


def _method_text(config: dict) -> str:
    method = dict(config.get("method") or {"name": "round"})
    name = method.pop("name", "round")
    method.pop("version", None)
    settings = ", ".join(f"{k}={v}" for k, v in method.items())
    return f"{name} ({settings})" if settings else name


def _rows(layers: dict) -> list[str]:
    """One row per (bits, group size, metadata, outliers) rung: its layers and weights."""
    counts: Counter = Counter()
    params: Counter = Counter()
    for entry in layers.values():
        spec = entry["spec"]
        outliers = spec.get("outlier_format", "csr") if entry.get("n_outliers", 0) else "-"
        key = (spec["bits"], spec.get("group_size") or -1, bool(spec.get("quant_meta")), outliers)
        counts[key] += 1
        params[key] += entry["shape"][0] * entry["shape"][1]
    total = max(sum(params.values()), 1)
    rows = []
    for key in sorted(counts):
        bits, group, meta, outliers = key
        rows.append(f"| {bits} | {'per-channel' if group == -1 else group} | {'8-bit' if meta else 'FP16'} | "
                    f"{outliers} | {counts[key]} | {100 * params[key] / total:.1f}% |")
    return rows


def render_card(config: dict, layers: dict, summary: dict, card: dict) -> str:
    """The README.md text of a checkpoint whose manifest holds ``config``, ``layers``, ``summary`` and ``card``."""
    from .. import __version__
    from ..pipeline.config import QuantConfig

    base = card.get("base_model", "unknown")
    hub_id = base.count("/") == 1 and not base.startswith((".", "/", "~")) and " " not in base
    by_bits = Counter(entry["spec"]["bits"] for entry in layers.values())
    outliers = config.get("outliers") or {}
    calib = config.get("calib") or {}
    tuning = config.get("tuning")
    calibration = "none"
    if QuantConfig.from_dict(config).calibrated:
        calibration = (f"{calib.get('source')}, {calib.get('samples')} windows of {calib.get('seqlen')} tokens, "
                       f"seed {calib.get('seed')}")
    lines = ["---", "library_name: transformers", "tags:", "- sensiquant", "- quantized"]
    if hub_id:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {base.rstrip('/').rsplit('/', 1)[-1]}: sensiquant, "
              f"{summary.get('bits_per_param', 0):.3f} bits/param", "",
              f"Weight-only post-training quantization of `{base}` by sensiquant {__version__}.", "",
              "| | |", "|---|---|",
              f"| base model | `{base}` |",
              f"| method | {_method_text(config)} |",
              f"| default layer | {_spec_text(config.get('default') or {})} |",
              f"| per-layer overrides | {len(config.get('overrides') or {})} |",
              f"| kept in full precision | {', '.join(f'`{p}`' for p in config.get('skip') or []) or 'nothing'} |",
              f"| outlier saliency | {outliers.get('saliency', 'grad')} (per {outliers.get('scope', 'matrix')}) |",
              f"| calibration | {calibration} |",
              f"| block tuning | {'none' if not tuning else 'SignRound, ' + str(tuning.get('iters')) + ' steps'} |",
              f"| quantized linears | {summary.get('n_layers', len(layers))} "
              f"({summary.get('quantized_params', 0):,} weights) |",
              f"| bits/param | {summary.get('bits_per_param', 0):.4f} (codes, scales, zeros and outliers of the "
              f"quantized linears) |",
              f"| stored bytes | {int(summary.get('quantized_bytes', 0)):,} |",
              f"| outliers | {summary.get('n_outliers', 0):,} |",
              "", "## Layers by bit width", "",
              "Layers per bit width: " + ", ".join(f"{bits}-bit: {by_bits[bits]}" for bits in sorted(by_bits)) + ".",
              "", "| bits | group size | scales/zeros | outliers | layers | weights |", "|---|---|---|---|---|---|",
              *_rows(layers), ""]
    ppl = card.get("perplexity") or {}
    if ppl:
        lines += ["## Perplexity", "", "| text | windows | tokens per window | PPL |", "|---|---|---|---|"]
        lines += [f"| {name} | {r.get('n_windows', '?')} | {r.get('seqlen', '?')} | {r['ppl']:.4f} |"
                  for name, r in ppl.items()]
        lines.append("")
    lines += ["## Loading", "", "```python",
              "import sensiquant  # registers quant_method \"sensiquant\" with transformers",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("path/to/this/checkpoint")  # packed QuantLinear layers',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/checkpoint")',
              "```", "",
              "or `model, tokenizer = sensiquant.load_quantized(path)`. Both check the checkpoint first (manifest "
              "checksum, every tensor against its layer's spec); `sensiquant verify PATH` also hashes the weights. "
              "Without `import sensiquant`, transformers refuses the checkpoint.", ""]
    return "\n".join(lines)
