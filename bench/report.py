"""Regenerate the tables of BENCHMARKS.md from bench/results/*.json (between <!-- NAME:start/end --> markers)."""

from __future__ import annotations

import json
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "BENCHMARKS.md"


def foundation_table(data: dict) -> str:
    rows = data["rows"]
    base = next((r for r in rows if r["name"] == "base" and "ppl" in r), None)
    lines = [f"SmolLM2-135M, WikiText-2 test, seqlen {data['seqlen']}, first {data['max_windows']} windows.", "",
             "| configuration | bits/param | PPL | PPL / base | quantize s | peak RSS MiB |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | - | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['ppl'] / base['ppl']:.3f}" if base else "-"
        lines.append(f"| {r['name']} | {r['bits_per_param']:.4f} | {r['ppl']:.2f} | {ratio} | "
                     f"{r['quantize_seconds']:.1f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def parity_table(data: dict) -> str:
    lines = ["| setting | package sq. error | ours (same settings) | ratio | ours L1 / package L1 | worst layer ratio "
             "| ours (defaults) | RTN | package s | ours s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(
            f"| {r['bits']}-bit g{r['group_size']} ({r['n_layers']} layers) | {r['package']['sq']:.4f} | "
            f"{r['ours_same']['sq']:.4f} | {r['ratio_sq_ours_same_to_package']:.4f} | "
            f"{r['ratio_abs_ours_same_to_package']:.4f} | {r['worst_layer_ratio_sq']:.4f} | "
            f"{r['ours_default']['sq']:.4f} | {r['rtn']['sq']:.4f} | {r['package']['seconds']:.1f} | "
            f"{r['ours_same']['seconds']:.1f} |")
    return "\n".join(lines)


def _model_title(data: dict) -> str:
    """The model a results file is about, as the tables name it (SmolLM2-135M when the file predates the field)."""
    model = data.get("model", "smollm2-135m")
    return {"smollm2-135m": "SmolLM2-135M"}.get(model, model)


def gwq_table(data: dict) -> str:
    model = _model_title(data)
    lines = [f"{model}, seqlen {data['seqlen']}, first {data['max_windows']} windows of WikiText-2 test "
             "and of C4.",
             "", "| configuration | bits/param | WikiText-2 PPL | C4 PPL | gradient s | Hessian s | quantize s "
             "| peak RSS MiB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | - | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {r['bits_per_param']:.4f} | {r['ppl_wikitext2']:.2f} | {r['ppl_c4']:.2f} | "
                     f"{r['gradient_seconds']:.1f} | {r['input_seconds']:.1f} | {r['quantize_seconds']:.1f} | "
                     f"{r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


# rows whose times shared the two cores carry a "note" saying with what: their times are marked
SHARED_FOOTNOTE = "(*) times inflated: other jobs shared the two cores (each row's note in the JSON)."


def _shared(row: dict) -> str:
    return " (*)" if row.get("note") else ""


def alloc_table(data: dict) -> str:
    """Per budget: every method's exact bits/param, PPL, and change against uniform HQQ at the same budget."""
    rows = [r for r in data["rows"] if "error" not in r]
    uniform = {r["spec"]["rung"]: r for r in rows if r["spec"]["variant"] == "uniform"}
    model = _model_title(data)
    lines = [f"{model}, seqlen {data['seqlen']}, first {data['max_windows']} windows of WikiText-2 test and "
             "of C4. Budget = exact bits/param of uniform HQQ at that rung (8-bit scales/zeros).", "",
             "| budget (rung) | method | bits/param | vs budget | WikiText-2 | vs uniform | C4 | vs uniform "
             "| flagged | quantize s |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in data["rows"]:
        if "error" in r:
            lines.append(f"| {r['spec']['rung']} | {r['spec']['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        u = uniform.get(r["spec"]["rung"])

        def rel(key, r=r, u=u):
            return f"{(r[key] / u[key] - 1) * 100:+.1f}%" if u else "-"

        lines.append(
            f"| {r['budget']:.4f} ({r['spec']['rung']}) | {r['spec']['variant']} | {r['bits_per_param']:.4f} | "
            f"{(r['bits_per_param'] / r['budget'] - 1) * 100:+.2f}% | {r['ppl_wikitext2']:.2f} | "
            f"{rel('ppl_wikitext2')} | {r['ppl_c4']:.2f} | {rel('ppl_c4')} | {', '.join(r['flagged']) or '-'} | "
            f"{r['quantize_seconds']:.0f}{_shared(r)} |")
    if any(_shared(r) for r in rows):
        lines += ["", SHARED_FOOTNOTE]
    return "\n".join(lines)


def zeroshot_table(data: dict) -> str:
    """One column per run (model, dtype, limit), one row per task: acc (+- stderr) and acc_norm."""
    runs = data["runs"]
    tasks = list(dict.fromkeys(t for run in runs.values() for t in run["tasks"]))
    lines = ["| task | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
    for task in tasks:
        cells = []
        for run in runs.values():
            r = run["tasks"].get(task)
            if r is None:
                cells.append("-")
                continue
            cell = f"acc {r['acc']:.4f} ± {r['acc_stderr']:.4f}"
            if "acc_norm" in r:
                cell += f"<br>norm {r['acc_norm']:.4f} ± {r['acc_norm_stderr']:.4f}"
            if "ppl" in r:
                cell += f"<br>ppl {r['ppl']:.2f}"
            cells.append(cell + f"<br>n={r['n']}, {r['seconds']:.0f} s")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    totals = [f"{run.get('total_seconds', 0) / 60:.1f} min" for run in runs.values()]
    lines.append("| whole run | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def _paired(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean and standard error of the per-example difference a - b (the same examples, scored by two models)."""
    from sensiquant.eval.zeroshot import mean_stderr

    d = [x - y for x, y in zip(a, b, strict=True)]
    return sum(d) / len(d), mean_stderr(d)


def peer_zeroshot_runs(peers: dict) -> dict[str, dict]:
    """The rows of a peers file scored with ``--zeroshot-limit``, as runs of ``zeroshot_quantized_table``."""
    return {f"{r['peer']} {r['setting']}": {"label": f"{r['peer']} {r['setting']}", "limit": r["zeroshot"]["limit"],
                                           "bits_per_param": r["bits_per_param"], "ppl_wikitext2": r["ppl_wikitext2"],
                                           "ppl_c4": r["ppl_c4"], "ppl_windows": peers["max_windows"],
                                           "tasks": r["zeroshot"]["tasks"]}
            for r in peers.get("rows", []) if "tasks" in r.get("zeroshot", {})}


def zeroshot_quantized_table(data: dict, peers: dict | None = None) -> str:
    """The GWQ paper's zero-shot table in its shape: one row per model (the base first), acc +- stderr per task, the
    mean over tasks, and the mean's change against the base with the paired standard error (the same examples).
    ``peers``: a peers results file whose rows were scored with ``--zeroshot-limit`` (rows after sensiquant's)."""
    runs = list({**data["runs"], **peer_zeroshot_runs(peers or {})}.items())
    if not runs:
        return "No model scored with zero-shot tasks yet."
    runs.sort(key=lambda item: "bits_per_param" in item[1])  # the base (no bits/param) first, the rest in run order
    tasks = list(dict.fromkeys(t for _, run in runs for t in run["tasks"]))
    base = next((run for _, run in runs if "bits_per_param" not in run), None)
    limits = {run["limit"] for _, run in runs}
    windows = {run["ppl_windows"] for _, run in runs if "ppl_windows" in run}
    lines = [f"First {', '.join(str(n) for n in sorted(limits, key=str))} examples of each task (all of a smaller "
             "one); acc ± standard error; the change of the mean against the base ± its paired standard error. "
             f"Perplexity on the first {', '.join(str(n) for n in sorted(windows)) or '-'} windows of 2048 tokens "
             "(float32; the tasks in bfloat16 with a float32 head).", "",
             "| model | bits/param | WikiText-2 PPL | C4 PPL | " + " | ".join(tasks) + " | mean | vs base |",
             "|---|---:|---:|---:|" + "---:|" * (len(tasks) + 2)]
    for name, run in runs:
        done = [t for t in tasks if t in run["tasks"]]
        cells = [f"{run['tasks'][t]['acc']:.3f} ± {run['tasks'][t]['acc_stderr']:.3f}" if t in run["tasks"] else "-"
                 for t in tasks]
        mean = sum(run["tasks"][t]["acc"] for t in done) / len(done) if len(done) == len(tasks) else None
        delta = "-"
        if mean is not None and base is not None and run is not base and all(t in base["tasks"] for t in tasks):
            pairs = [_paired(run["tasks"][t]["per_example"], base["tasks"][t]["per_example"]) for t in tasks]
            se = sum(s ** 2 for _, s in pairs) ** 0.5 / len(tasks)
            delta = f"{sum(m for m, _ in pairs) / len(tasks) * 100:+.2f} ± {se * 100:.2f} pts"
        bits = f"{run['bits_per_param']:.3f}" if "bits_per_param" in run else "32 (base)"
        ppl = " | ".join(f"{run[k]:.2f}" if k in run else "-" for k in ("ppl_wikitext2", "ppl_c4"))
        lines.append(f"| {run.get('label', name)} | {bits} | {ppl} | " + " | ".join(cells) +
                     f" | {'-' if mean is None else f'{mean:.4f}'} | {delta} |")
    return "\n".join(lines)


def _eval_seconds(row: dict) -> str:
    """A peer row's evaluation time; "-" for llama.cpp rows from before its adapter timed its own scoring."""
    if row["eval_seconds"] < 0.01:
        return "-"
    return f"{row['eval_seconds']:.1f}{_shared(row)}"


def peers_table(data: dict) -> str:
    """Every peer and setting: bits/param, PPL on both sets, ratios to sensiquant's nearest-size row, time, RSS."""
    lines = [f"{data['model']}, first {data['max_windows']} windows of {data['seqlen']} tokens of WikiText-2 test and "
             f"C4; {data['calib_windows']} WikiText-2 validation windows for peers that calibrate.", "",
             "| peer | setting | bits/param | WikiText-2 PPL | C4 PPL | quantize s | eval s | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        name = f"{r['peer']} {r.get('version', '')}".strip()
        if "unavailable" in r:
            lines.append(f"| {name} | - | cannot run here: {r['unavailable']} | | | | | |")
        elif "error" in r:
            lines.append(f"| {name} | {r['setting']} | failed: {r['error'][:200]} | | | | | |")
        else:
            lines.append(f"| {name} | {r['setting']} | {r['bits_per_param']:.3f} | {r['ppl_wikitext2']:.2f} | "
                         f"{r['ppl_c4']:.2f} | {r['quantize_seconds']:.1f}{_shared(r)} | "
                         f"{_eval_seconds(r)} | {r['peak_rss_mb']:.0f} |")
    if any(_shared(r) for r in data["rows"]):
        lines += ["", SHARED_FOOTNOTE]
    return "\n".join(lines)


def speed_table(data: dict) -> str:
    """Prefill/decode tok/s and memory per row; decode as a ratio of the fp32 and bf16 originals run by the same
    decoder and of llama.cpp Q4_K_M (all in the same run)."""
    rows = data["rows"]
    base = {(r["name"], r.get("decoder")): r.get("decode_tokens_per_second") for r in rows if "error" not in r}
    llama = base.get(("llama.cpp Q4_K_M", None))
    cpu = f"{data['cpu']}; " if data.get("cpu") else ""
    lines = [f"{cpu}SmolLM2-135M, batch 1, {data['prompt_tokens']}-token prompt then {data['new_tokens']} greedy "
             f"tokens, {data['threads']} threads, best of the repeats; every row in a fresh process, one at a time.",
             "",
             "| model | decoder | bits/param | kernels | prefill tok/s | decode tok/s | decode / fp32 | "
             "decode / bf16 | decode / llama.cpp Q4_K_M | peak RSS MiB | resident / stored weight bytes |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(x, y):
        return f"{x / y:.2f}" if x and y else "-"

    for r in rows:
        decoder = r.get("decoder") or "-"
        if "error" in r:
            lines.append(f"| {r['name']} | {decoder} | - | failed: {r['error'][:200]} | | | | | | | |")
            continue
        dec = r["decode_tokens_per_second"]
        fp32 = base.get(("original fp32", r.get("decoder")))
        bf16 = base.get(("original bf16", r.get("decoder")))
        held = ratio(r.get("resident_weight_bytes"), r.get("stored_weight_bytes"))
        bits = f"{r['bits_per_param']:.3f}" if "bits_per_param" in r else "-"
        kernels = ", ".join(f"{k} {v}" for k, v in r.get("kernels", {}).items()) or r.get("dtype", "")
        isa = r.get("extension", {}).get("isa")
        if isa and "packed" in r.get("kernels", {}):
            kernels += f" ({isa})"
        lines.append(f"| {r['name']} | {decoder} | {bits} | {kernels} | {r['prefill_tokens_per_second']:.0f} | "
                     f"{dec:.1f} | {ratio(dec, fp32)} | {ratio(dec, bf16)} | {ratio(dec, llama)} | "
                     f"{r.get('peak_rss_mb', 0):.0f} | {held} |")
    return "\n".join(lines)


def _rows_table(data: dict, header: str, render) -> str:
    """One bench's rows as a table under a line naming the windows: model, setting, then ``render(row)``'s cells;
    a failed row says why."""
    n_columns = header.count("|") - 1
    lines = [f"First {data['max_windows']} windows of {data['seqlen']} tokens of WikiText-2 test and of C4.", "",
             header, "|---|---|" + "---:|" * (n_columns - 2)]
    for r in data["rows"]:
        model, _, name = r["name"].partition(": ")
        if "error" in r:
            lines.append(f"| {model} | {name} | - | failed: {r['error']} |" + " |" * (n_columns - 4))
        else:
            lines.append(f"| {model} | {name} | {render(r)} |")
    return "\n".join(lines)


def accuracy_table(data: dict) -> str:
    """bench.accuracy rows: model, setting, exact bits/param, both PPLs, tuning losses, time and memory."""
    def render(r):
        loss = r.get("tuning_loss_start_end")
        loss = f"{loss[0]:.1f} -> {loss[1]:.1f}" if loss else "-"
        return (f"{r['bits_per_param']:.4f} | {r['ppl_wikitext2']:.2f} | {r['ppl_c4']:.2f} | {loss} | "
                f"{r['gradient_seconds']:.0f} | {r['quantize_seconds']:.0f} | {r['peak_rss_mb']:.0f}")

    return _rows_table(data, "| model | configuration | bits/param | WikiText-2 PPL | C4 PPL | block loss start -> end "
                             "| gradient s | quantize s | peak RSS MiB |", render)


def plan_budget_table(data: dict) -> str:
    """bench.plan_budget rows: setting, exact bits/param, both PPLs, planning time by stage, quantize time, memory."""
    def render(r):
        stages = r.get("plan_stage_seconds")
        plan = (f"{r['plan_seconds']:.0f} ({stages.get('gradients', 0):.0f} / {stages.get('errors', 0):.0f} / "
                f"{stages.get('sensitivity', 0):.0f})" if stages else "-")
        shared = _shared(r)
        return (f"{r['bits_per_param']:.4f} | {r['n_outliers']:,} | {r['ppl_wikitext2']:.2f} | {r['ppl_c4']:.2f} | "
                f"{plan}{shared} | {r['quantize_seconds']:.0f}{shared} | {r['peak_rss_mb']:.0f}")

    table = _rows_table(data, "| model | setting | bits/param | outliers | WikiText-2 PPL | C4 PPL | plan s "
                              "(gradients / errors / sensitivity) | quantize s | peak RSS MiB |", render)
    return table + "\n\n" + SHARED_FOOTNOTE


TABLES = {"foundation": ("foundation.json", foundation_table), "hqq_parity": ("hqq_parity.json", parity_table),
          "gwq": ("gwq.json", gwq_table), "accuracy": ("accuracy.json", accuracy_table),
          "alloc": ("alloc.json", alloc_table), "alloc_qwen": ("alloc_qwen2.5-coder-0.5b.json", alloc_table),
          "zeroshot": ("zeroshot.json", zeroshot_table),
          "zeroshot_quantized": ("zeroshot_quantized.json", lambda data: zeroshot_quantized_table(
              data, json.loads((HERE / "results" / "peers.json").read_text()))),
          "peers": ("peers.json", peers_table), "peers_qwen": ("peers_qwen.json", peers_table),
          "zeroshot_qwen": ("peers_qwen.json", lambda data: zeroshot_quantized_table({"runs": {}}, data)),
          "speed": ("speed.json", speed_table), "speed_avx2": ("speed_avx2.json", speed_table),
          "plan_budget": ("plan_budget.json", plan_budget_table)}


def alloc_plots() -> list[Path]:
    """PPL against bits/param for every method of bench/alloc.py, and what two plans decided and why."""
    from sensiquant.planning import Plan
    from sensiquant.plots import plot_allocation, plot_ppl_vs_bits, plot_profiles

    results = HERE / "results"
    if not (results / "alloc.json").is_file():
        return []
    rows = [{"method": r["spec"]["variant"], **r} for r in json.loads((results / "alloc.json").read_text())["rows"]
            if "error" not in r]
    written = [plot_ppl_vs_bits(rows, results / f"alloc_{m}.png", f"ppl_{m}",
                                f"SmolLM2-135M, {name}: PPL against exact bits/param")
               for m, name in (("wikitext2", "WikiText-2"), ("c4", "C4"))]
    for stem in ("b3g64-sensiboost_exact", "b3g64-kurtboost_exact", "b3g32-sensiboost_exact_fisher_plusgwq"):
        path = results / "alloc_plans" / f"{stem}.json"
        if path.is_file():
            plan = Plan.load(path)
            written.append(plot_allocation(plan, results / f"{stem}-allocation.png"))
            if plan.profiles:
                written.append(plot_profiles(plan, results / f"{stem}-scores.png"))
    return written


def main() -> None:
    alloc_plots()
    text = DOC.read_text()
    for name, (file, render) in TABLES.items():
        path = HERE / "results" / file
        if not path.is_file():
            continue
        table = render(json.loads(path.read_text()))
        pattern = re.compile(rf"(<!-- {name}:start -->).*?(<!-- {name}:end -->)", re.S)
        text = pattern.sub(lambda m, t=table: f"{m.group(1)}\n{t}\n{m.group(2)}", text)
    DOC.write_text(text)


if __name__ == "__main__":
    main()
