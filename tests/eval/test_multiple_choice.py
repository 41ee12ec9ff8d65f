import json
import os
import subprocess
import sys

import pytest

from pyllm.eval import Task, TaskConfig, evaluate_multiple_choice, load_task, predictions, run_tasks

from .conftest import tiny_model, uniform_model


def test_acc_and_acc_norm_differ_on_constructed_scores():
    # choice 0: -4 nats over 2 chars (-2/char); choice 1: -6 nats over 6 chars (-1/char)
    assert predictions([-4.0, -6.0], ["ab", "abcdef"]) == {"acc": 0, "acc_norm": 1, "acc_bytes": 1}
    # "ééé" is 3 characters but 6 bytes: per byte it wins, per character it loses
    assert predictions([-7.0, -5.0], ["ééé", "abcd"]) == {"acc": 1, "acc_norm": 1, "acc_bytes": 0}
    assert predictions([-1.0, -1.0], ["a", "b"])["acc"] == 0  # ties go to the first choice (numpy argmax)


def mc_task(items):
    docs = [(d, f"test#{i}") for i, d in enumerate(items)]
    return Task(TaskConfig(name="mc", kind="multiple_choice", template="Pick:"), docs)


def test_acc_norm_and_acc_bytes_on_a_uniform_model(tok):
    # Under a uniform model a choice's log-prob is -(its byte tokens, delimiter included) * log V:
    # acc prefers the fewest bytes, acc_norm the most bytes per character, acc_bytes the most characters...
    # per byte. The gold answers below are what each metric's rule picks, so the metrics separate.
    model = uniform_model(tok.vocab_size)
    items = [
        {"choices": ["ab", "abcdefgh"], "answer": 1},   # acc -> 0; acc_norm, acc_bytes -> 1 (longer)
        {"choices": ["ééé", "abcd"], "answer": 0},      # acc, acc_norm -> 1; acc_bytes -> 0
        {"choices": ["x", "yy", "zzz"], "answer": 0},   # acc -> 0; acc_norm, acc_bytes -> 2
    ]
    r = evaluate_multiple_choice(model, tok, mc_task(items))
    assert r == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(1 / 3), "acc_bytes": pytest.approx(2 / 3),
                 "n": 3}


def test_multiple_choice_from_file_matches_direct_scores(tmp_path, tok):
    items = [{"q": "2+2", "opts": ["4", "five", "22"], "label": 0},
             {"q": "sky", "opts": ["blue", "green"], "label": 1}]
    (tmp_path / "d.jsonl").write_text("\n".join(map(json.dumps, items)))
    (tmp_path / "t.json").write_text(json.dumps({"name": "f", "kind": "multiple_choice", "data": "d.jsonl",
                                                 "template": "Q: {{q}}\nA:", "choices": "opts", "answer": "label"}))
    model = tiny_model(tok.vocab_size)
    from pyllm.eval import Scorer, encode_pair

    scorer, expect = Scorer(model), {"acc": 0.0, "acc_norm": 0.0, "acc_bytes": 0.0}
    for it in items:
        lps = [scorer.loglikelihood([encode_pair(tok, f"Q: {it['q']}\nA:", " " + c)])[0].logprob for c in it["opts"]]
        for m, p in predictions(lps, it["opts"]).items():
            expect[m] += (p == it["label"]) / len(items)
    assert run_tasks(model, tok, [str(tmp_path / "t.json")])["f"] == {**expect, "n": 2}
    model.train()
    run_tasks(model, tok, [load_task(tmp_path / "t.json")])
    assert model.training  # mode restored


def _heldout_in_another_process(names: list[str]) -> list[str]:
    """The names pyllm.eval.is_heldout holds out in a fresh interpreter with another PYTHONHASHSEED."""
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    code = ("import json, sys; from pyllm.eval import is_heldout; "
            "print(json.dumps([n for n in json.load(sys.stdin) if is_heldout(n)]))")
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(names), capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONHASHSEED": seed})
    return json.loads(out.stdout)


def test_builtin_stdlib_tasks(tok):
    from pyllm.data.stdlib import stdlib_docstrings
    from pyllm.eval import builtin_task, is_heldout

    docs = dict(stdlib_docstrings())
    heldout = [n for n in docs if is_heldout(n)]
    assert 0.07 < len(heldout) / len(docs) < 0.13  # about 10%, by hash
    # a pure function of the name: another process, whose hash() is salted differently, holds out the same ones
    assert _heldout_in_another_process(list(docs)) == heldout
    task = builtin_task("stdlib_name", num_fewshot=2, limit=20)
    for i, item in enumerate(task.items):
        assert is_heldout(item.doc["name"]) and item.choices[item.gold] == item.doc["name"]
        assert len(set(item.choices)) == 4 and all(is_heldout(c) for c in item.choices)
        assert not any(is_heldout(ex.doc["name"]) for ex in task.fewshot_examples(i))
    doc_task = builtin_task("stdlib_doc", limit=5)
    assert all(it.choices[it.gold] == it.doc["summary"] for it in doc_task.items)
    r = run_tasks(uniform_model(tok.vocab_size, max_seq_len=128), tok, ["stdlib_name"], limit=3, num_fewshot=0)
    assert r["stdlib_name"]["n"] == 3


def test_a_choice_longer_than_the_context_is_warned_of():
    from pyllm.eval.loglik import Scorer

    scorer = Scorer(tiny_model(256, max_seq_len=16))
    with pytest.warns(RuntimeWarning, match="1 continuation\\(s\\) longer than the 16-token context"):
        long, short = scorer.choices([1, 2, 3], [list(range(5, 30)), [5, 6]])
    assert long.n_tokens == 16 and short.n_tokens == 2  # the scored tokens
