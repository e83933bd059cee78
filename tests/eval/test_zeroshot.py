import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sensiquant.cli import main
from sensiquant.errors import SensiquantError
from sensiquant.eval.zeroshot import (
    DEFAULT_TASKS,
    Example,
    encode_pair,
    evaluate_zeroshot,
    load_task,
    loglikelihoods,
    mean_stderr,
    resolve_tasks,
    run_lm_eval,
    score_examples,
)
from sensiquant.io import load_model


def byte_tokenizer():
    from bench.tiny_model import byte_tokenizer

    return byte_tokenizer()


class BigramLM(nn.Module):
    """A causal LM whose next-token logits depend only on the current token: a table we control."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)
        self.config = SimpleNamespace(max_position_embeddings=512)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def _write_task(root, name: str, rows: list[dict]) -> None:
    path = root / "zeroshot" / "llm-foundry" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_scorer_picks_the_choice_the_logits_force(tmp_path):
    tok = byte_tokenizer()
    forced = tok(" yes", add_special_tokens=False).input_ids
    table = torch.zeros(256, 256)
    table[:, forced] = 8.0  # every token of " yes" is likely after any token; nothing else is
    model = BigramLM(table)
    rows = [{"query": "Question: is it?\n", "choices": ["yes", "no"], "gold": 0},
            {"query": "Question: is it not?\n", "choices": ["no", "yes"], "gold": 1},
            {"query": "Question: and this?\n", "choices": ["yes", "no"], "gold": 1}]  # gold disagrees with the model
    _write_task(tmp_path, "piqa.jsonl", rows)
    result = evaluate_zeroshot(model, tok, "piqa", data_dir=tmp_path, progress=False)["piqa"]
    assert result.per_example == [1, 1, 0]
    assert result.acc == pytest.approx(2 / 3)
    assert result.acc_stderr == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2 / 3))
    # the log-likelihood of the forced choice is what the table says, token by token
    ctx, cont = encode_pair(tok, "Question: is it?\nAnswer:", " yes")
    (ll, greedy), = loglikelihoods(model, tok, [("Question: is it?\nAnswer:", " yes")], progress=False)
    expected = sum(float(torch.log_softmax(table[t], -1)[n]) for t, n in zip((ctx + cont)[-len(cont) - 1:-1], cont))
    assert ll == pytest.approx(expected, abs=1e-5)


def test_lambada_accuracy_is_greedy_match(tmp_path):
    tok = byte_tokenizer()
    table = torch.zeros(256, 256)
    word = tok(" cat", add_special_tokens=False).input_ids
    for prev, nxt in zip([tok(".", add_special_tokens=False).input_ids[-1], *word[:-1]], word):
        table[prev, nxt] = 9.0  # after "." comes " ", then "c", "a", "t"
    _write_task(tmp_path, "lambada_openai.jsonl", [{"context": "the end.", "continuation": "cat"},
                                                   {"context": "the end.", "continuation": "dog"}])
    result = evaluate_zeroshot(BigramLM(table), tok, "lambada", data_dir=tmp_path, progress=False)["lambada_openai"]
    assert result.per_example == [1, 0] and result.acc == 0.5 and result.ppl > 1


def test_acc_norm_divides_by_choice_characters():
    ex = Example(["q"] * 2, [" a", " bbbb"], ["a", "bbbb"], gold=1)
    result = score_examples("t", [ex], [(-2.0, False), (-4.0, False)], norm=True, kind="choice")
    assert result.acc == 0.0  # -2 > -4
    assert result.acc_norm == 1.0  # -2/1 < -4/4


def test_stderr_is_lm_evals():
    assert mean_stderr([1, 0, 1, 1]) == pytest.approx(0.25)  # sample std 0.5 / sqrt(4)
    assert mean_stderr([1]) == 0.0


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "winogrande"])
def test_batching_and_shared_contexts_do_not_change_the_scores(tiny_llama, data_dir, task):
    model, tok = load_model(str(tiny_llama))
    examples = load_task(task, data_dir, limit=6)
    requests = [(c, k) for ex in examples for c, k in zip(ex.contexts, ex.continuations)]
    one = loglikelihoods(model, tok, requests, batch_tokens=1, share_context=False, progress=False)
    for kwargs in (dict(batch_tokens=8192, share_context=False), dict(batch_tokens=1), dict(batch_tokens=8192)):
        many = loglikelihoods(model, tok, requests, progress=False, **kwargs)
        assert [g for _, g in one] == [g for _, g in many], kwargs
        assert max(abs(a - b) for (a, _), (b, _) in zip(one, many)) < 1e-4, kwargs


def test_long_contexts_are_cut_on_the_left(tiny_llama):
    model, tok = load_model(str(tiny_llama))
    context = "x" * 30 + "the quick brown fox"
    cut = loglikelihoods(model, tok, [(context, " jumps"), (context, " runs")], max_length=20, progress=False)
    alone = loglikelihoods(model, tok, [(context[-15:], " jumps")], progress=False)  # 15 + 6 - 1 inputs = 20
    assert cut[0][0] == pytest.approx(alone[0][0], abs=1e-4)


def test_every_task_runs_end_to_end(tiny_llama, data_dir):
    model, tok = load_model(str(tiny_llama))
    results = evaluate_zeroshot(model, tok, "all", limit=3, data_dir=data_dir, progress=False)
    assert list(results) == list(DEFAULT_TASKS)
    for name, r in results.items():
        assert r.n == 3 and 0.0 <= r.acc <= 1.0 and r.n_requests >= 3, name
        assert (r.acc_norm is not None) == (name in ("piqa", "arc_easy", "arc_challenge", "hellaswag", "openbookqa"))
    assert results["lambada_openai"].ppl > 1


def test_task_files_parse_with_the_standard_sizes(data_dir):
    sizes = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267,
             "hellaswag": 10042, "lambada_openai": 5153, "openbookqa": 500}
    for name, n in sizes.items():
        examples = load_task(name, data_dir)
        assert len(examples) == n, name
        assert all(0 <= ex.gold < len(ex.continuations) for ex in examples), name
    boolq = load_task("boolq", data_dir, limit=1)[0]
    assert not boolq.contexts[0].startswith("Passage:") and boolq.contexts[0].endswith("?\nAnswer:")
    assert boolq.continuations == [" no", " yes"]


def test_cli_eval_tasks_json(tiny_llama, data_dir, capsys):
    rc = main(["eval", str(tiny_llama), "--tasks", "piqa,lambada", "--limit", "2", "--data-dir", str(data_dir),
               "--json", "--quiet"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["tasks"]) == {"piqa", "lambada_openai"} and out["ppl"] == {}
    assert out["tasks"]["piqa"]["n"] == 2 and "acc_stderr" in out["tasks"]["piqa"]


def test_bad_task_input(tmp_path, tiny_llama, capsys):
    with pytest.raises(SensiquantError, match="unknown task"):
        resolve_tasks("piqa,mmlu")
    with pytest.raises(SensiquantError, match="task file not found"):
        load_task("piqa", tmp_path)
    assert main(["eval", str(tiny_llama), "--tasks", "nope"]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_lm_eval_adapter_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import fails as if not installed
    with pytest.raises(SensiquantError, match="pip install lm-eval"):
        run_lm_eval(None, None, ["piqa"])
