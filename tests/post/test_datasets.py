"""Built-in data: answers, noisy demonstrations, the held-out split, docstring preferences."""

import json
import os
import subprocess
import sys

import pytest

from pyllm.post.datasets import (Conversation, docstring_pairs, solve_task, split, task_examples,
                                 task_pairs, task_reward)
from pyllm.post.grpo import GRPOConfig
from pyllm.post.rollout import rl_setup


def test_task_answers_and_reward():
    assert solve_task("12+7=") == "19" and solve_task("sort 3912") == "1239" and solve_task("reverse abc") == "cba"
    assert task_reward("12+7=", " 19 ") == 1.0 and task_reward("12+7=", "18") == 0.0
    with pytest.raises(ValueError, match="not a built-in task prompt"):
        task_reward("hello", "x")
    for pair in task_pairs(n=300):
        assert pair.chosen == solve_task(pair.prompt) != pair.rejected


def test_noisy_demonstrations_keep_the_right_reference():
    clean, noisy = task_examples(n=600), task_examples(n=600, noise=0.5)
    assert [e.prompt for e in clean] == [e.prompt for e in noisy]
    wrong = sum(e.completion != e.reference for e in noisy) / len(noisy)
    assert 0.4 < wrong < 0.6
    assert all(e.reference == c.completion for e, c in zip(noisy, clean))


def test_split_is_deterministic_and_disjoint():
    items = task_examples(n=1000)
    train, held = split(items, 0.2)
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in held})
    assert 0.15 < len(held) / len(items) < 0.25
    assert split(items, 0.2) == (train, held)
    # the same in a fresh interpreter whose hash() is salted differently (runs and processes agree)
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    code = ("import json; from pyllm.post.datasets import split, task_examples; "
            "print(json.dumps([e.prompt for e in split(task_examples(n=1000), 0.2)[1]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": seed})
    assert json.loads(out.stdout) == [e.prompt for e in held]


def test_docstring_pairs_respect_the_eval_holdout():
    from pyllm.eval.builtin import is_heldout as eval_heldout

    pairs = docstring_pairs(n=400)
    assert len(pairs) > 300 and all(p.chosen != p.rejected for p in pairs)
    train, _ = split(pairs, 0.2)
    names = [p.prompt[len("What does "):-len(" do?")] for p in train]
    assert not any(eval_heldout(n) for n in names)  # the evaluation's reserved functions never train


def test_rl_prompt_longer_than_context_names_its_origin(tmp_path):
    data = tmp_path / "prompts.jsonl"
    rows = "".join(f'{{"prompt": "{i}+1=", "completion": "{i + 1}"}}\n' for i in range(20))
    data.write_text(rows + '{"prompt": "' + "x" * 200 + '", "completion": "y"}\n')
    cfg = GRPOConfig(data=str(data), out_dir=str(tmp_path / "g"), heldout_fraction=0.5, seq_len=64,
                     group_size=2, prompts_per_rollout=2,
                     train={"model": {"n_layer": 1, "d_model": 32, "n_head": 2}, "batch_size": 4})
    with pytest.raises(ValueError, match=r"prompts.jsonl:21: prompt is \d+ tokens; with max_new_tokens=8"):
        rl_setup(cfg)


def test_chat_split_keys_on_the_conversation_prompt_not_its_first_message():
    def chat(*turns):
        return Conversation(tuple({"role": r, "content": c} for r, c in turns))

    system = ("system", "You are a helpful assistant.")
    convs = [chat(system, ("user", f"reverse w{i}abc"), ("assistant", f"cba{i}w")) for i in range(200)]
    train, held = split(convs, 0.2)  # the shared system message used to put all 200 on one side
    assert 0.1 < len(held) / len(convs) < 0.3
    # a single-turn chat keeps its key (the user message); a longer conversation with the same opening is on
    # the same side, so a held-out opening is never trained on
    single = chat(("user", "hi"), ("assistant", "hello"))
    assert single.prompt == json.dumps([{"role": "user", "content": "hi"}])
    longer = chat(("user", "hi"), ("assistant", "hello"), ("user", "bye"), ("assistant", "ciao"))
    assert longer.prompt == single.prompt
    assert [m["role"] for m in json.loads(convs[0].prompt)] == ["system", "user"]


def test_a_lone_surrogate_escape_names_file_line_and_field(tmp_path):
    # valid JSON, but not text a tokenizer can encode: the codec error used to name no file
    from pyllm.post.chat import ChatTemplate
    from pyllm.post.datasets import DataError, load_examples, load_pairs
    from pyllm.post.packing import encode_examples
    from pyllm.tokenizer import ByteTokenizer

    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "emoji \\ud83d", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl:2: field 'prompt' holds a lone surrogate '\\ud83d' at character 6"):
        load_examples(data)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a\\udc00", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:1: field 'chosen' holds a lone surrogate"):
        load_pairs(pairs)
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi \\ud83d"}, '
                    '{"role": "assistant", "content": "x"}]}\n')
    items = load_examples(chat)
    split(items, 0.2)  # the split key is JSON (escaped): no error here, the encoding names the line
    with pytest.raises(DataError, match=r"chat.jsonl:1: .*surrogates not allowed"):
        encode_examples(ChatTemplate(ByteTokenizer()), items, 64)


def test_sft_help_names_every_builtin_dataset():
    """`pyllm sft --help` prints SFTConfig's docstring: it listed five of the seven built-in datasets."""
    from pyllm.post.datasets import BUILTIN_EXAMPLES
    from pyllm.post.sft import SFTConfig

    listed = SFTConfig.__doc__.split("builtin:")[1].split()[0].split("|")
    assert sorted(listed) == sorted(BUILTIN_EXAMPLES)
