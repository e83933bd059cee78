"""Zero-shot accuracy by log-likelihood scoring, following lm-evaluation-harness conventions.

Every task becomes, per example, a few (context, continuation) requests; the model scores
log P(continuation | context) and the answer is the best-scoring choice:

* ``acc``: argmax of the summed log-likelihood of each choice;
* ``acc_norm`` (tasks where lm-eval reports it): argmax of log-likelihood divided by the choice's length in
  characters, as lm-eval does (``len(choice)`` without the leading space);
* LAMBADA: ``acc`` = the last word is the greedy continuation, token by token; ``ppl`` = exp(-mean log-likelihood);
* WinoGrande: "partial" scoring, the two options are two contexts sharing one continuation.

Prompts are lm-eval's (``Question: ...\\nAnswer:`` for PIQA and ARC, ``passage\\nQuestion: ...?\\nAnswer:`` for BoolQ,
the question stem for OpenBookQA, ``label: context`` for HellaSwag), rebuilt from the local task files described
in ``shared/data/zeroshot/README.md``. Tokenization follows lm-eval too: no special tokens, trailing spaces of the
context moved to the continuation, continuation tokens = tokens(context + continuation) past tokens(context).
Standard errors are lm-eval's: sample standard deviation (ddof 1) over examples / sqrt(n).
"""

from __future__ import annotations

import bz2
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import find_data_dir
from ..errors import SensiquantError


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's file lives, how to turn a row into an example, and which metrics it reports."""

    path: str  # under the data directory's ``zeroshot/`` folder
    kind: str  # "choice" | "partial" | "lambada" | "hellaswag"
    norm: bool = False  # report acc_norm
    prompt: str = "plain"  # "question" (append "\nAnswer:"), "boolq", "plain"


TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("llm-foundry/piqa.jsonl", "choice", norm=True, prompt="question"),
    "arc_easy": TaskSpec("llm-foundry/arc_easy.jsonl", "choice", norm=True, prompt="question"),
    "arc_challenge": TaskSpec("llm-foundry/arc_challenge.jsonl", "choice", norm=True, prompt="question"),
    "boolq": TaskSpec("llm-foundry/boolq.jsonl", "choice", prompt="boolq"),
    "winogrande": TaskSpec("llm-foundry/winogrande.jsonl", "partial"),
    "hellaswag": TaskSpec("hellaswag/hellaswag_val_full.txt.bz2", "hellaswag", norm=True),
    "lambada_openai": TaskSpec("llm-foundry/lambada_openai.jsonl", "lambada"),
    "openbookqa": TaskSpec("llm-foundry/openbook_qa.jsonl", "choice", norm=True),
    "copa": TaskSpec("llm-foundry/copa.jsonl", "choice"),
}
DEFAULT_TASKS = ("piqa", "arc_easy", "arc_challenge", "boolq", "winogrande", "hellaswag", "lambada_openai",
                 "openbookqa")
BATCH_TOKENS = 4096  # padded tokens per forward batch
ALIASES = {"lambada": "lambada_openai", "openbook_qa": "openbookqa", "arc_e": "arc_easy", "arc_c": "arc_challenge"}


@dataclass
class Example:
    """One question: a context and a continuation per choice (``choices`` are the texts acc_norm divides by)."""

    contexts: list[str]
    continuations: list[str]
    choices: list[str]
    gold: int


@dataclass
class TaskResult:
    task: str
    n: int
    acc: float
    acc_stderr: float
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    ppl: float | None = None  # LAMBADA only
    n_requests: int = 0
    seconds: float = 0.0
    per_example: list[int] = field(default_factory=list, repr=False)  # 1 if correct (acc), for paired comparisons

    def to_dict(self, with_examples: bool = False) -> dict:
        d = asdict(self)
        if not with_examples:
            d.pop("per_example")
        return {k: v for k, v in d.items() if v is not None}


def resolve_tasks(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """Task names from a comma-separated string or a list; "all" is the eight standard tasks."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for name in names:
        if name == "all":
            out += [t for t in DEFAULT_TASKS if t not in out]
            continue
        name = ALIASES.get(name, name)
        if name not in TASKS:
            raise SensiquantError(f"unknown task {name!r}: choose from {', '.join(TASKS)} or 'all'")
        if name not in out:
            out.append(name)
    if not out:
        raise SensiquantError("no tasks given")
    return out


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """The examples of a task from the local data directory (first ``limit`` of them when given)."""
    spec = TASKS[resolve_tasks([name])[0]]
    root = find_data_dir(data_dir)
    if root is None:
        raise SensiquantError("no data directory: pass data_dir or set $SENSIQUANT_DATA_DIR (layout of shared/data)")
    path = root / "zeroshot" / spec.path
    if not path.is_file():
        raise SensiquantError(f"task file not found: {path}")
    if limit is not None and limit < 1:
        raise SensiquantError(f"limit must be at least 1, got {limit}")
    rows = _hellaswag_rows(path) if spec.kind == "hellaswag" else _jsonl_rows(path)
    if limit is not None:
        rows = rows[:limit]
    return [_example(row, spec) for row in rows]


def _jsonl_rows(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _hellaswag_rows(path: Path) -> list[dict]:
    """llama.cpp's HellaSwag text format: 6 lines per task (context, gold, four endings), already preprocessed."""
    lines = bz2.decompress(path.read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise SensiquantError(f"{path}: {len(lines)} lines, not a multiple of 6")
    return [{"query": lines[i], "gold": int(lines[i + 1]), "choices": lines[i + 2:i + 6]}
            for i in range(0, len(lines), 6)]


def _example(row: dict, spec: TaskSpec) -> Example:
    if spec.kind == "partial":
        options = row["context_options"]
        return Example(list(options), [" " + row["continuation"]] * len(options), list(options), int(row["gold"]))
    if spec.kind == "lambada":
        return Example([row["context"]], [" " + row["continuation"]], [row["continuation"]], 0)
    query = row["query"]
    if spec.prompt == "question":
        query = query.rstrip("\n") + "\nAnswer:"
    elif spec.prompt == "boolq":
        query = query.removeprefix("Passage: ") + "\nAnswer:"
    choices = list(row["choices"])
    return Example([query] * len(choices), [" " + c for c in choices], choices, int(row["gold"]))


# ---------------------------------------------------------------------------------------------------- scoring


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids: trailing spaces of the context go to the
    continuation; the continuation tokens are those of context + continuation past the context's tokens; an empty
    context becomes the end-of-text token."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        eot = tokenizer.eos_token_id
        if eot is None:
            raise SensiquantError("an empty context needs a tokenizer with an end-of-text token")
        return [eot], tokenizer(continuation, add_special_tokens=False).input_ids
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: list[tuple[str, str]], max_length: int | None = None,
                   batch_tokens: int = BATCH_TOKENS, progress: bool = True, desc: str = "loglik",
                   share_context: bool = True) -> list[tuple[float, bool]]:
    """(sum of log P(continuation tokens | context), whether every continuation token is the argmax) per request.

    Requests that share a context (the choices of one question) run as one sequence when ``share_context``: the
    context once, then every continuation, each attending to the context and to itself only (a 4D mask, positions
    restarting after the context), which is the same computation as one sequence per choice with the context's
    work done once (HellaSwag: about half the tokens). Sequences are sorted by length and batched up to
    ``batch_tokens`` padded tokens, left-padded so only the last logits are computed. Contexts longer than
    ``max_length`` (default: the model's maximum positions, at most 2048) are cut on the left.
    """
    if not requests:
        return []
    max_length = max_length or min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048)
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise SensiquantError(f"continuation {continuation!r} has no tokens")
        encoded.append((ctx, cont))
    # one packed item per run of requests with the same context ids: (context ids, [(request, continuation)])
    items: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
    for i, (ctx, cont) in enumerate(encoded):
        if share_context and items and items[-1][0] == ctx and \
                len(ctx) + sum(len(c) for _, c in items[-1][1]) + len(cont) <= max_length:
            items[-1][1].append((i, cont))
        else:
            items.append((ctx, [(i, cont)]))
    results: list[tuple[float, bool] | None] = [None] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, disable=not progress)
    order = sorted(range(len(items)), key=lambda k: (-_packed_length(items[k], max_length), k))
    start = 0
    while start < len(order):
        longest = _packed_length(items[order[start]], max_length)
        batch = order[start:start + max(1, batch_tokens // longest)]
        start += len(batch)
        for (i, _), scored in zip(*_score_packed(model, tokenizer, [items[k] for k in batch], longest, max_length)):
            results[i] = scored
        bar.update(sum(len(items[k][1]) for k in batch))
    bar.close()
    return results  # type: ignore[return-value]


def _packed_length(item, max_length: int) -> int:
    """Input length of a packed item: context (cut to fit) + every continuation but the last token of the last."""
    ctx, conts = item
    cont_len = sum(len(c) for _, c in conts)
    return min(len(ctx), max_length + 1 - cont_len) + cont_len - 1


def _score_packed(model, tokenizer, items, length: int, max_length: int):
    """One forward over left-padded packed items; returns ([(request, continuation)], [(loglik, greedy)])."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    n = len(items)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    allowed = torch.zeros((n, length, length), dtype=torch.bool)
    targets = []  # per row: (request, continuation ids, input positions whose logits predict it)
    for row, (ctx, conts) in enumerate(items):
        ctx = ctx[-(max_length + 1 - sum(len(c) for _, c in conts)):] if len(conts) == 1 else ctx[-max_length:]
        seq, pos, owner = list(ctx), list(range(len(ctx))), [-1] * len(ctx)
        for j, (_, cont) in enumerate(conts):
            take = cont[:-1] if j == len(conts) - 1 else cont
            seq += take
            pos += list(range(len(ctx), len(ctx) + len(take)))
            owner += [j] * len(take)
        offset = length - len(seq)
        ids[row, offset:] = torch.tensor(seq)
        positions[row, offset:] = torch.tensor(pos)
        own = torch.tensor(owner)
        causal = torch.tril(torch.ones(len(seq), len(seq), dtype=torch.bool))
        visible = (own[None, :] == -1) | (own[None, :] == own[:, None])  # the context, and one's own continuation
        allowed[row, offset:, offset:] = causal & visible
        allowed[row, torch.arange(length), torch.arange(length)] = True  # padding rows see themselves (no NaN)
        cursor = offset + len(ctx)
        for _, cont in conts:
            # cont[0] is predicted by the last context token, cont[t] by the input holding cont[t - 1]
            targets.append((cont, [offset + len(ctx) - 1] + list(range(cursor, cursor + len(cont) - 1))))
            cursor += len(cont)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
    first = min(p[0] for _, p in targets)
    keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
    kwargs = {"logits_to_keep": length - first} if keep_arg else {}
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                   use_cache=False, **kwargs).logits.float()
    shift = length - logits.shape[1]
    keys, scores = [], []
    flat_targets = iter(targets)
    for row, (_, conts) in enumerate(items):
        for request, _ in conts:
            cont, where = next(flat_targets)
            lp = torch.log_softmax(logits[row, [w - shift for w in where]], dim=-1)
            cont_t = torch.tensor(cont, device=lp.device)
            keys.append((request, cont))
            scores.append((float(lp.gather(-1, cont_t[:, None]).sum()), bool((lp.argmax(-1) == cont_t).all())))
    return keys, scores


def mean_stderr(values: list[float]) -> float:
    """lm-eval's mean_stderr: sample standard deviation (ddof 1) / sqrt(n); 0 for fewer than two values."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_examples(task: str, examples: list[Example], lls: list[tuple[float, bool]], norm: bool,
                   kind: str) -> TaskResult:
    """Metrics of a task from the per-request log-likelihoods (in example order, choices in order)."""
    correct, correct_norm, it = [], [], iter(lls)
    total_ll = 0.0
    for ex in examples:
        scored = [next(it) for _ in ex.continuations]
        if kind == "lambada":
            correct.append(int(scored[0][1]))
            total_ll += scored[0][0]
            continue
        ll = [s[0] for s in scored]
        correct.append(int(_argmax(ll) == ex.gold))
        if norm:
            ll_norm = [v / max(len(c), 1) for v, c in zip(ll, ex.choices)]
            correct_norm.append(int(_argmax(ll_norm) == ex.gold))
    n = len(examples)
    result = TaskResult(task, n, sum(correct) / n, mean_stderr(correct), n_requests=len(lls), per_example=correct)
    if norm:
        result.acc_norm, result.acc_norm_stderr = sum(correct_norm) / n, mean_stderr(correct_norm)
    if kind == "lambada":
        result.ppl = math.exp(-total_ll / n)
    return result


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])  # first of ties, as numpy.argmax


def evaluate_zeroshot(model, tokenizer, tasks: str | list[str] = "all", limit: int | None = None,
                      data_dir: str | Path | None = None, batch_tokens: int = BATCH_TOKENS, progress: bool = True
                      ) -> dict[str, TaskResult]:
    """Zero-shot accuracy of ``model`` on local task files; ``limit`` scores the first N examples of each task."""
    names = resolve_tasks(tasks)
    loaded = {name: load_task(name, data_dir, limit) for name in names}  # every file read before any model work
    results = {}
    was_training = model.training
    model.eval()
    try:
        for name in names:
            spec, examples = TASKS[name], loaded[name]
            start = time.perf_counter()
            requests = [(c, k) for ex in examples for c, k in zip(ex.contexts, ex.continuations)]
            lls = loglikelihoods(model, tokenizer, requests, batch_tokens=batch_tokens, progress=progress,
                                 desc=name)
            result = score_examples(name, examples, lls, spec.norm, spec.kind)
            result.seconds = time.perf_counter() - start
            results[name] = result
    finally:
        model.train(was_training)
    return results


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """Run the same tasks through lm-evaluation-harness (when installed and its datasets are reachable).

    Returns lm-eval's ``results`` dict. The local scorer above needs neither; this adapter exists to cross-check
    it and to reach lm-eval's other tasks.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise SensiquantError("lm-evaluation-harness is not installed: pip install lm-eval") from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit)
    except Exception as exc:  # datasets unreachable offline, unknown task, ...
        raise SensiquantError(f"lm-eval failed: {exc}") from exc
    return out["results"]
