"""Command handlers: parse the flags into configs, call the API, return a plain result dict for printing."""

from __future__ import annotations

from ..errors import SensiquantError

# flags of `quantize` that only some configs use: (flag, attribute) -> the config must use it, or it is an error
_CALIB_FLAGS = {"--calib": "calib", "--calib-samples": "calib_samples", "--calib-seqlen": "calib_seqlen"}
_OUTLIER_FLAGS = {"--saliency": "saliency", "--outlier-scope": "outlier_scope"}
_GPTQ_FLAGS = {"--act-order": "act_order"}
_TUNE_FLAGS = {"--tune-iters": "tune_iters", "--tune-lr": "tune_lr", "--tune-dtype": "tune_dtype"}
_METHOD_FLAGS = {"--method": "method", "--preset": "preset", "--bits": "bits", "--group-size": "group_size",
                 "--quant-meta": "quant_meta", "--grid": "grid", "--outlier-ratio": "outlier_ratio",
                 "--outlier-format": "outlier_format", "--gguf": "gguf", **_OUTLIER_FLAGS, **_GPTQ_FLAGS}
_PPL_FLAGS = {"--max-windows": "max_windows"}


def split(text: str | None) -> list[str]:
    return [s.strip() for s in (text or "").split(",") if s.strip()]


def _given(args, flags: dict[str, str]) -> list[str]:
    return [flag for flag, attr in flags.items() if getattr(args, attr, None) is not None]


def quant_config(args):
    """The QuantConfig of a `quantize` command line: the recipe of --method, changed by the flags given."""
    from ..api import DEFAULT_RECIPE
    from ..methods import GPTQConfig
    from ..pipeline import preset, recipe

    if args.preset and args.method:
        raise SensiquantError("give either --preset or --method, not both")
    name = args.method or (None if args.preset else DEFAULT_RECIPE)
    if args.grid is not None and name in ("rtn", "hqq"):
        raise SensiquantError(f"--grid applies to gptq, gptaq and gwq; --method {name} is its own grid")
    base = preset(args.preset) if args.preset else recipe(name)
    spec_changes = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size),
                                      ("quant_meta", args.quant_meta), ("grid", args.grid),
                                      ("outlier_ratio", args.outlier_ratio),
                                      ("outlier_format", args.outlier_format)) if v is not None}
    if getattr(args, "gguf", None):
        if args.bits is not None or args.group_size is not None or args.quant_meta:
            raise SensiquantError(f"--gguf {args.gguf} sets bits, group size and the scales' storage: drop --bits, "
                                  "--group-size and --quant-meta")
        if base.default.outlier_ratio or args.outlier_ratio:
            raise SensiquantError(f"--gguf {args.gguf} keeps no outliers: use --method gptq, rtn or hqq")
        spec_changes.update(gguf=args.gguf, quant_meta=False)
    spec = base.default.replace(**spec_changes)
    outliers = base.outliers.replace(**{k: v for k, v in (("saliency", args.saliency), ("scope", args.outlier_scope),
                                                          ("seed", args.seed)) if v is not None})
    calib = base.calib.replace(**{k: v for k, v in (("source", args.calib), ("samples", args.calib_samples),
                                             ("seqlen", args.calib_seqlen), ("seed", args.seed),
                                             ("data_dir", args.data_dir)) if v is not None})
    method = base.method
    if args.act_order is not None:
        if not isinstance(method, GPTQConfig):
            raise SensiquantError(f"--act-order applies to GPTQ (--method gptq, gptaq or gwq), not --method {name}")
        method = method.replace(act_order=args.act_order)
    tuning = tuning_config(args, base.tuning)
    config = base.replace(method=method, default=spec, skip=tuple(split(args.skip)), outliers=outliers, calib=calib,
                          tuning=tuning)
    if spec.outlier_ratio == 0 and _given(args, _OUTLIER_FLAGS):
        raise SensiquantError(f"{_given(args, _OUTLIER_FLAGS)[0]} applies only with outliers (--outlier-ratio > 0)")
    if not config.calibrated and _given(args, _CALIB_FLAGS):
        raise SensiquantError(f"{_given(args, _CALIB_FLAGS)[0]} applies only to methods that calibrate "
                              f"(gptq, gptaq, gwq, or outliers ranked by a calibrated saliency)")
    return config


def tuning_config(args, base=None):
    """The block tuning of a `quantize` command line: ``base`` (the recipe's or preset's), switched by --tune /
    --no-tune and changed by --tune-iters / --tune-lr / --tune-dtype; None for no tuning."""
    from ..methods import SignRoundConfig

    tuning = base
    if args.tune is not None:
        tuning = (tuning or SignRoundConfig()) if args.tune else None
    if tuning is None and _given(args, _TUNE_FLAGS):
        raise SensiquantError(f"{_given(args, _TUNE_FLAGS)[0]} applies only with block tuning (--tune)")
    if tuning is not None:
        tuning = tuning.replace(**{k: v for k, v in (("iters", args.tune_iters), ("lr", args.tune_lr),
                                                     ("compute_dtype", args.tune_dtype)) if v is not None})
    return tuning


def plan_config(args, **overrides):
    """The PlanConfig of a command line; ``overrides`` (e.g. the best method's settings) win over the flags."""
    from ..planning import PlanConfig

    defaults = PlanConfig()
    kwargs = {"budget": args.budget, "skip": tuple(split(args.skip))}
    for name in ("method", "exact", "error_metric", "objective", "apply_method", "outlier_format", "error_fit", "stop",
                 "threshold", "min_rung_bits"):
        if getattr(args, name, None) is not None:
            kwargs[name] = getattr(args, name)
    if getattr(args, "outlier_ratios", None) is not None:
        try:
            kwargs["outlier_ratios"] = tuple(float(r) for r in split(args.outlier_ratios)) or (0.0,)
        except ValueError:
            raise SensiquantError(f"bad --outlier-ratios {args.outlier_ratios!r}: expected numbers like "
                                  "0,0.01") from None
    if getattr(args, "error_rows", None) is not None:
        if args.error_rows < 0:
            raise SensiquantError(f"--error-rows must be 0 (all rows) or a positive number, got {args.error_rows}")
        kwargs["error_rows"] = args.error_rows or None
    if getattr(args, "top_m", None) is not None:
        kwargs["top_m"] = None if args.top_m < 0 else args.top_m
    if getattr(args, "ladder", None):
        kwargs["ladder"] = tuple(split(args.ladder))
    seed = getattr(args, "seed", None)
    common = {k: v for k, v in (("source", getattr(args, "calib", None)), ("seed", seed),
                                ("data_dir", args.data_dir)) if v is not None}
    sensitivity = {k: v for k, v in (("samples", getattr(args, "calib_samples", None)),
                                     ("seqlen", getattr(args, "calib_seqlen", None))) if v is not None}
    kwargs["sensitivity_calib"] = defaults.sensitivity_calib.replace(**common, **sensitivity)
    kwargs["gradient_calib"] = defaults.gradient_calib.replace(**common)
    return PlanConfig(**{**kwargs, **overrides})


def eval_texts(args, tokenizer=None) -> dict[str, str]:
    """Read the evaluation texts before any model work, so a missing file fails fast; with ``tokenizer`` also
    check that each holds at least one window."""
    from ..data import load_text
    from ..eval.perplexity import tokenize_windows

    if not args.ppl and _given(args, _PPL_FLAGS):
        raise SensiquantError(f"{_given(args, _PPL_FLAGS)[0]} applies only with --ppl")
    texts = {name: load_text(name, "test", args.data_dir) for name in split(args.ppl)}
    if tokenizer is None:
        return texts
    for name, text in texts.items():
        try:
            tokenize_windows(tokenizer, text, args.seqlen, args.max_windows)
        except SensiquantError as exc:
            raise SensiquantError(f"--ppl {name}: {exc}") from None
    return texts


def preflight(args, calib=None) -> dict[str, str]:
    """Everything a quantize command can check before loading the model: the output directory, the evaluation
    texts (at least one window each) and the calibration text; returns the evaluation texts."""
    from ..api import check_not_a_checkpoint, check_out_dir
    from ..calib import calibration_windows
    from ..io import load_tokenizer
    from ..io.streamed import release_freed_memory

    if args.overwrite and not args.out:
        raise SensiquantError("--overwrite applies only with --out")
    check_not_a_checkpoint(args.model)
    if args.out:
        check_out_dir(args.out, args.model, args.overwrite)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    texts = eval_texts(args, tokenizer)
    if calib is not None:
        try:
            calibration_windows(tokenizer, calib)
        except SensiquantError as exc:
            raise SensiquantError(f"calibration ({calib.source}): {exc}") from None
    release_freed_memory()  # tokenizing whole texts takes hundreds of MB (C4: about 400): hand them back first
    return texts


def _perplexities(model, tokenizer, texts, args) -> dict:
    from ..api import evaluate_perplexity

    return {name: r.to_dict() for name, r in evaluate_perplexity(
        model, tokenizer, seqlen=args.seqlen, max_windows=args.max_windows, progress=not args.quiet,
        texts=texts).items()}


def _measure(texts, args, into: dict):
    """The ``evaluate`` of a quantize command: the --ppl perplexities, kept in ``into`` for the output, measured
    before the checkpoint is written so that its model card shows them."""
    def evaluate(model, tokenizer):
        into.update(_perplexities(model, tokenizer, texts, args))
        return into
    return evaluate


def cmd_quantize(args) -> dict:
    from ..api import DEFAULT_RECIPE, model_size_bytes, quantize

    if args.plan or args.budget is not None:
        return cmd_quantize_planned(args)
    if args.ladder:
        raise SensiquantError("--ladder applies only with --budget")
    config = quant_config(args)
    texts = preflight(args, config.calib if config.calibrated else None)
    ppl: dict = {}
    model, tokenizer, report = quantize(args.model, config, args.out, progress=not args.quiet,
                                        trust_remote_code=args.trust_remote_code, overwrite=args.overwrite,
                                        evaluate=_measure(texts, args, ppl), resume=args.resume,
                                        device=args.device, stream=args.stream)
    return {"model": args.model, "method": args.method or (None if args.preset else DEFAULT_RECIPE),
            "preset": args.preset, "spec": config.default.to_dict(), "tuned": config.tuning is not None,
            **report.summary(),
            "model_bytes": model_size_bytes(model), "out": args.out, "ppl": ppl}


def cmd_quantize_planned(args) -> dict:
    from ..api import model_size_bytes, quantize_with_plan
    from ..planning import BEST_METHOD, Plan, best_tuned

    if args.plan and args.budget is not None:
        raise SensiquantError("give either --plan or --budget, not both")
    if args.preset is not None and (args.plan or args.preset != "best"):
        raise SensiquantError(f"--preset {args.preset} does not apply with {'--plan' if args.plan else '--budget'} "
                              "(--budget takes --preset best: the plan block-tuned)")
    if args.stream:
        raise SensiquantError("--stream does not apply plans yet: run --plan/--budget without it")
    if args.plan and args.ladder:
        raise SensiquantError("--ladder applies only with --budget (a plan file has its rungs)")
    flags = [f for f in _given(args, _METHOD_FLAGS) if f != "--preset"]
    flags += _given(args, {**_CALIB_FLAGS, "--seed": "seed"}) if args.plan else []
    if flags:
        raise SensiquantError(f"{flags[0]} does not apply with {'--plan' if args.plan else '--budget'}: the plan "
                              "chooses every layer's configuration")
    # an explicit --ladder is used as given: its low rungs are not held back for budgets that need them
    best = {**BEST_METHOD, "min_rung_bits": 0} if args.ladder else BEST_METHOD
    plan = Plan.load(args.plan) if args.plan else plan_config(args, **best)
    base_tuning = None
    if args.preset == "best":
        plan, base_tuning = best_tuned(plan)
    tuning = tuning_config(args, base_tuning)
    texts = preflight(args)
    ppl: dict = {}
    model, tokenizer, report, plan = quantize_with_plan(args.model, plan, args.out, progress=not args.quiet,
                                                        trust_remote_code=args.trust_remote_code,
                                                        overwrite=args.overwrite, tuning=tuning,
                                                        evaluate=_measure(texts, args, ppl), resume=args.resume,
                                                        device=args.device)
    return {"model": args.model, **report.summary(), "model_bytes": model_size_bytes(model), "out": args.out,
            "ppl": ppl}


def cmd_plan(args) -> dict:
    from pathlib import Path

    from ..api import plan as make_plan

    out = Path(args.out)
    if out.is_dir():
        raise SensiquantError(f"--out {args.out} is a directory; give the plan file's path")
    config = plan_config(args)
    if args.plots and not Path(args.plots).is_dir():
        from ..api import check_out_dir

        check_out_dir(args.plots, args.model)  # a new folder: creatable, not a file, not the model's
    plan = make_plan(args.model, config, progress=not args.quiet, trust_remote_code=args.trust_remote_code)
    plan.save(args.out)
    result = {"model": args.model, **plan.summary(), "plan": args.out, "seconds": sum(plan.seconds.values())}
    if args.plots:
        from ..plots import plot_allocation, plot_profiles

        folder = Path(args.plots)
        result["plots"] = [str(plot_allocation(plan, folder / "allocation.png"))]
        if plan.profiles:
            result["plots"].append(str(plot_profiles(plan, folder / "scores.png")))
    return result


def cmd_eval(args) -> dict:
    import torch

    from ..eval.zeroshot import BATCH_TOKENS, evaluate_zeroshot, load_task, resolve_tasks
    from ..io import load_model
    from ..runtime import float32_head, model_size_bytes

    if args.tasks is None and (args.limit is not None or args.batch_tokens is not None):
        raise SensiquantError(f"{'--limit' if args.limit is not None else '--batch-tokens'} applies only with --tasks")
    if args.ppl is None and args.tasks is None:
        args.ppl = "wikitext2"
    texts = eval_texts(args)
    tasks = resolve_tasks(args.tasks) if args.tasks else []
    for name in tasks:  # every task file read before the model loads, so a missing one fails fast
        load_task(name, args.data_dir, args.limit)
    if args.stream:
        return _eval_streamed(args, texts, tasks)
    model, tokenizer = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer is None:
        raise SensiquantError(f"{args.model} has no tokenizer files")
    result = {"model": args.model, "model_bytes": model_size_bytes(model), "dtype": args.dtype}
    report = getattr(model, "sensiquant_report", None)
    if report is not None:
        result["bits_per_param"] = report.bits_per_param
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
        float32_head(model)
    result["ppl"] = _perplexities(model, tokenizer, texts, args)
    if tasks:
        scores = evaluate_zeroshot(model, tokenizer, tasks, limit=args.limit, data_dir=args.data_dir,
                                   batch_tokens=args.batch_tokens or BATCH_TOKENS, progress=not args.quiet)
        result["tasks"] = {name: r.to_dict() for name, r in scores.items()}
    return result


def _eval_streamed(args, texts: dict[str, str], tasks: list[str]) -> dict:
    """``eval --stream``: perplexity of a model larger than memory, one block's weights in memory at a time."""
    import math
    import time

    from ..eval.perplexity import streamed_nll, tokenize_windows
    from ..io.streamed import open_streamed

    if tasks or args.dtype != "float32":
        raise SensiquantError("--stream scores perplexity in float32 only (no --tasks, no --dtype)")
    streamed = open_streamed(args.model, args.trust_remote_code, not args.quiet)
    result: dict = {"model": args.model, "dtype": "float32", "streamed": True, "ppl": {}}
    for name, text in texts.items():
        start = time.perf_counter()
        windows = tokenize_windows(streamed.tokenizer, text, args.seqlen, args.max_windows)
        total, count = streamed_nll(streamed, windows, not args.quiet, desc=f"ppl {name}")
        result["ppl"][name] = {"ppl": math.exp(total / count), "nll": total / count, "n_windows": windows.shape[0],
                               "seqlen": windows.shape[1], "n_tokens": count,
                               "seconds": time.perf_counter() - start}
    return result


def _inference(args):
    import torch

    from ..api import load_for_inference

    if args.threads is not None:
        if args.threads < 1:
            raise SensiquantError(f"threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return load_for_inference(args.model, args.dtype, args.fast, args.widen, args.trust_remote_code)


def cmd_generate(args) -> dict:
    from ..runtime.speed import generator

    if args.max_new_tokens < 2:
        raise SensiquantError(f"--max-new-tokens must be at least 2, got {args.max_new_tokens}")
    model, tokenizer, info = _inference(args)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    generate, info["decoder"] = generator(model, args.decoder, max_len=ids.shape[1] + args.max_new_tokens,
                                          head_bits=args.head_bits, act8=args.act8)
    tokens, prefill, decode = generate(ids, args.max_new_tokens)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return {**info, "prompt": args.prompt, "completion": text, "tokens": tokens,
            "decode_tokens_per_second": (len(tokens) - 1) / decode if decode > 0 else None}


def cmd_bench_speed(args) -> dict:
    from ..runtime import measure_speed

    model, tokenizer, info = _inference(args)
    result = measure_speed(model, tokenizer, args.prompt_tokens, args.new_tokens, data_dir=args.data_dir,
                           decoder=args.decoder, head_bits=args.head_bits, act8=args.act8)
    return {**info, **result.to_dict()}


def cmd_verify(args) -> dict:
    from ..io import verify_checkpoint

    return {"model": args.model, "verified": verify_checkpoint(args.model)}


def cmd_export(args) -> dict:
    if args.format == "compressed-tensors":
        from ..io.compressed_tensors import export_compressed_tensors

        result = export_compressed_tensors(args.model, args.out, progress=not args.quiet,
                                           trust_remote_code=args.trust_remote_code)
        return {"model": args.model, "compressed_tensors": result.pop("out"), **result}
    from ..io.gguf_export import export_gguf

    result = export_gguf(args.model, args.out, base=args.base, fallback=args.fallback, embed_type=args.embed_type,
                         progress=not args.quiet)
    return {"model": args.model, "gguf": result.pop("out"), **result}


COMMANDS = {"quantize": cmd_quantize, "export": cmd_export, "plan": cmd_plan,
            "eval": cmd_eval, "generate": cmd_generate,
            "bench-speed": cmd_bench_speed, "verify": cmd_verify}


