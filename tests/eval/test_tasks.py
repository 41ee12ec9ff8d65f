import json

import pytest

from pyllm.eval import Task, TaskConfig, TaskError, load_task


def write_task(tmp_path, items, name="t.yaml", extra="", fewshot=None):
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    if fewshot is not None:
        (tmp_path / "shots.jsonl").write_text("".join(json.dumps(i) + "\n" for i in fewshot))
        extra += "\nfewshot_data: shots.jsonl"
    path = tmp_path / name
    path.write_text(f'name: quiz\nkind: multiple_choice\ndata: items.jsonl\ntemplate: "Q: {{{{q}}}}\\nA:"\n'
                    f'choices: opts\nanswer: label{extra}\n')
    return path


GOOD = [{"q": f"question {i}", "opts": ["yes", "no"], "label": i % 2} for i in range(6)]


def test_load_task_renders_items(tmp_path):
    task = load_task(write_task(tmp_path, GOOD))
    assert task.name == "quiz" and len(task.items) == 6
    assert task.items[3].prompt == "Q: question 3\nA:" and task.items[3].gold == 1
    assert task.context(0) == "Q: question 0\nA:"  # 0-shot: just the prompt
    assert len(load_task(tmp_path / "t.yaml", limit=2).items) == 2


@pytest.mark.parametrize("bad,match", [
    ({"q": "x", "opts": ["a", "b"]}, r"items.jsonl:3: missing field 'label'"),
    ({"q": "x", "opts": ["a", "b"], "label": 2}, r"items.jsonl:3: answer index label=2 is out of range for 2 choices"),
    ({"q": "x", "opts": ["a", "b"], "label": -1}, r"items.jsonl:3: answer index"),
    ({"q": "x", "opts": [], "label": 0}, r"items.jsonl:3: field 'opts' is an empty list of choices"),
    ({"opts": ["a"], "label": 0}, r"items.jsonl:3: template refers to a missing field \('q' is undefined\)"),
    ({"q": "x", "opts": "ab", "label": 0}, r"items.jsonl:3: field 'opts' must be list"),
    ({"q": "x", "opts": ["a", ""], "label": 0}, r"items.jsonl:3: field 'opts' must hold non-empty strings"),
])
def test_bad_item_names_file_and_line(tmp_path, bad, match):
    path = write_task(tmp_path, [GOOD[0], GOOD[1], bad])
    with pytest.raises(TaskError, match=match):
        load_task(path)


def test_bad_task_file(tmp_path):
    path = write_task(tmp_path, GOOD)
    text = path.read_text()
    path.write_text(text.replace("data: items.jsonl\n", ""))
    with pytest.raises(TaskError, match=r"t.yaml: missing field 'data'"):
        load_task(path)
    path.write_text(text + "colour: red\n")
    with pytest.raises(TaskError, match=r"t.yaml: unknown field\(s\) \['colour'\]"):
        load_task(path)
    path.write_text(text.replace("kind: multiple_choice", "kind: essay"))
    with pytest.raises(TaskError, match=r"t.yaml: task 'quiz': field 'kind'='essay'"):
        load_task(path)
    path.write_text(text.replace("data: items.jsonl", "data: nowhere.jsonl"))
    with pytest.raises(TaskError, match=r"nowhere.jsonl: data file not found"):
        load_task(path)
    (tmp_path / "items.jsonl").write_text('{"q": "x", "opts": ["a"], "label": 0}\n{not json\n')
    path.write_text(text)
    with pytest.raises(TaskError, match=r"items.jsonl:2: not valid JSON \(Expecting property name .* at column 2\)"):
        load_task(path)
    (tmp_path / "items.jsonl").write_text('{"q": "a\u2028b", "opts": ["x", "y"], "label": 0}\n', encoding="utf-8")
    assert load_task(path).items[0].prompt == "Q: a\u2028b\nA:"  # a line separator inside a JSON string
    (tmp_path / "items.jsonl").write_bytes(b'{"q": "caf\xe9"}\n')  # Latin-1, not UTF-8
    with pytest.raises(TaskError, match=r"items.jsonl:1: not UTF-8 text \(byte 10\)"):
        load_task(path)
    path.write_bytes(text.encode() + b"# \xff\n")
    with pytest.raises(TaskError, match=r"t.yaml: not UTF-8 text"):
        load_task(path)
    with pytest.raises(TaskError, match="task file not found"):
        load_task(tmp_path / "missing.yaml")


def test_kshot_from_pool_of_eval_items_never_includes_the_item(tmp_path):
    # no few-shot file: examples come from the other evaluated items; k = n - 1 forces every other one
    task = load_task(write_task(tmp_path, GOOD, extra="\nnum_fewshot: 5"))
    for i, item in enumerate(task.items):
        ctx = task.context(i)
        assert ctx.endswith(item.prompt) and ctx.count(item.prompt) == 1
        shots = task.fewshot_examples(i)
        assert len(shots) == 5 and item not in shots
        assert all(f"{s.prompt} {s.target}\n\n" in ctx for s in shots)


def test_kshot_separate_split_skips_a_duplicate_of_the_item(tmp_path):
    # the few-shot file contains a copy of item 0: it must never be shown when item 0 is evaluated
    shots = [GOOD[0], {"q": "shot a", "opts": ["yes", "no"], "label": 0}, {"q": "shot b", "opts": ["yes", "no"], "label": 1}]
    task = load_task(write_task(tmp_path, GOOD, extra="\nnum_fewshot: 2", fewshot=shots))
    assert {s.prompt for s in task.fewshot_examples(0)} == {"Q: shot a\nA:", "Q: shot b\nA:"}
    assert task.context(0).count("question 0") == 1
    assert any("question 0" in task.context(i) for i in range(1, 6))  # the copy is a valid shot elsewhere


def test_kshot_is_deterministic_and_seeded(tmp_path):
    shots = [{"q": f"shot {i}", "opts": ["yes", "no"], "label": i % 2} for i in range(20)]
    path = write_task(tmp_path, GOOD, extra="\nnum_fewshot: 3", fewshot=shots)
    a, b = load_task(path), load_task(path)
    assert [a.context(i) for i in range(6)] == [b.context(i) for i in range(6)]
    other = load_task(path, fewshot_seed=7)
    assert [a.context(i) for i in range(6)] != [other.context(i) for i in range(6)]
    assert a.context(2).startswith("Q: shot")


def test_limit_does_not_change_the_fewshot_examples(tmp_path):
    # the pool is the whole file: --limit N scores the first N items with the prompts of the full run
    items = [{"q": f"question {i}", "opts": ["yes", "no"], "label": i % 2} for i in range(10)]
    path = write_task(tmp_path, items, extra="\nnum_fewshot: 3")
    full = load_task(path)
    for limit in (1, 4, 9):
        limited = load_task(path, limit=limit)
        assert len(limited.items) == limit
        assert [limited.context(i) for i in range(limit)] == [full.context(i) for i in range(limit)]


def test_not_enough_fewshot_examples(tmp_path):
    with pytest.raises(TaskError, match="num_fewshot=6 but the few-shot pool has only 5"):
        load_task(write_task(tmp_path, GOOD, extra="\nnum_fewshot: 6"))


def test_config_validation_messages():
    with pytest.raises(TaskError, match="num_samples > 1 needs temperature > 0"):
        TaskConfig(name="g", kind="generation", template="x", num_samples=4)
    with pytest.raises(TaskError, match=r"pass_k.*num_samples=2"):
        TaskConfig(name="g", kind="generation", template="x", num_samples=2, temperature=1.0, pass_k=[3])
    with pytest.raises(TaskError, match="normalize"):
        TaskConfig(name="g", kind="generation", template="x", normalize=["shout"])
    with pytest.raises(TaskError, match="no items"):
        Task(TaskConfig(name="g", kind="generation", template="x"), [])


@pytest.mark.parametrize("line,match", [
    ("stop: null", r"field 'stop' must be a list of strings \(or a single string\), got None"),
    ("stop: [5]", r"field 'stop' must be a list of strings \(or a single string\), got \[5\]"),
    ("temperature: null", r"field 'temperature' must be a number, got None"),
    ("max_new_tokens: '8'", r"field 'max_new_tokens' must be an integer, got '8'"),
    ("num_samples: true", r"field 'num_samples' must be an integer, got True"),
])
def test_task_file_field_of_the_wrong_type_is_one_line_naming_file_and_field(tmp_path, line, match):
    path = write_task(tmp_path, GOOD, extra=f"\n{line}")
    with pytest.raises(TaskError, match=rf"^{tmp_path}/t.yaml: task 'quiz': {match}$"):
        load_task(path)


def test_a_single_stop_string_is_one_stop_string_not_its_characters(tmp_path):
    from pyllm.eval.generation import cut_at_stop

    items = [{"q": "capital of France", "a": "Paris"}]
    (tmp_path / "items.jsonl").write_text(json.dumps(items[0]) + "\n")
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nkind: generation\ntemplate: 'Question: {{q}}'\nanswer: a\ndata: items.jsonl\n"
                    "stop: 'Question:'\ntemperature: 0\n")
    cfg = load_task(path).cfg
    assert cfg.stop == ["Question:"] and cfg.temperature == 0.0 and isinstance(cfg.temperature, float)
    assert cut_at_stop("Paris\nQuestion: next", cfg.stop) == "Paris\n"  # was cut at the first 'u': "Par"
