"""Post-training data: JSONL readers (errors name file and line) and built-in sets generated at run time.

Built-in sets, no download:
- verifiable tasks (``add``, ``sort``, ``reverse``): a prompt, its one right answer, and an exact-match
  checker that is the reward of PPO / GRPO. Sized for a byte tokenizer and a tiny model.
- ``tasks`` preferences: the right answer preferred over a plausible wrong one (off by one, unsorted...).
- ``docstrings`` preferences and instructions: "What does json.dumps do?" answered by the first
  sentence of its docstring (preferred) or another function's (rejected), from
  ``pyllm.data.stdlib.stdlib_docstrings()``.

Held-out split: a prompt is held out when a hash of its text falls below ``heldout_fraction``, so the
same prompt lands on the same side in every stage and every run, and held-out prompts are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pyllm.data.jsonl import JsonLinesError, read_json_lines

TASKS = ("add", "sort", "reverse")


class DataError(ValueError):
    """Bad input data, reported as ``file:line: problem``."""

    def __init__(self, origin: str, line: int | None, problem: str):
        super().__init__(f"{origin}:{line}: {problem}" if line is not None else f"{origin}: {problem}")


@dataclass(frozen=True)
class Example:
    """A single-turn instruction example (SFT) or a prompt with a known answer (RL tasks)."""

    prompt: str
    completion: str
    task: str = "jsonl"
    origin: str = ""
    """Where it came from, ``file:line`` or ``builtin:<set>``: named in error messages."""
    heldout: bool | None = None
    """Forced split side; None: decided by a hash of the prompt."""

    @property
    def reference(self) -> str:
        """The right answer: computed from the prompt for built-in tasks (whose completion may be a noisy
        demonstration), else the completion."""
        answer = solve_task(self.prompt) if self.task in TASKS else None
        return answer if answer is not None else self.completion


@dataclass(frozen=True)
class Pair:
    """A preference: ``chosen`` is better than ``rejected`` as an answer to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    origin: str = ""
    heldout: bool | None = None
    """Forced split side; None: decided by a hash of the prompt."""


HELDOUT_FRACTION = 0.2
"""The default share of prompts held out (StageConfig.heldout_fraction)."""


def is_heldout(key: str, fraction: float) -> bool:
    """Deterministic split: True for about ``fraction`` of keys, the same in every process and run."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    return h / 2.0**64 < fraction


def split(items: list, fraction: float) -> tuple[list, list]:
    """(train, heldout) by the prompt of each item (Example or Pair)."""
    train, heldout = [], []
    for it in items:
        held = getattr(it, "heldout", None)
        (heldout if (held if held is not None else is_heldout(it.prompt, fraction)) else train).append(it)
    return train, heldout


# ------------------------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a line that is not a JSON object is a DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(str(path), None, "file not found")
    try:
        rows = list(read_json_lines(path))
    except JsonLinesError as e:
        raise DataError(e.path, e.line, e.problem) from None
    if not rows:
        raise DataError(str(path), None, "no rows")
    return rows


def _field(path, n, obj, name) -> str:
    if name not in obj:
        raise DataError(str(path), n, f"missing field {name!r} (fields present: {sorted(obj)})")
    if not isinstance(obj[name], str) or not obj[name]:
        raise DataError(str(path), n, f"field {name!r} must be a non-empty string, got {obj[name]!r}")
    try:  # JSON may escape a lone UTF-16 surrogate ("\ud83d", text cut inside an emoji): no tokenizer takes it
        obj[name].encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(str(path), n, f"field {name!r} holds a lone surrogate {obj[name][e.start]!r} at character "
                        f"{e.start}, not valid Unicode text (cut inside a character?)") from None
    return obj[name]


def load_examples(path: str | Path) -> list:
    """SFT rows: {"prompt", "completion"} -> Example, or {"messages": [{"role", "content"}, ...]} -> Conversation."""
    out = []
    for n, obj in read_jsonl(path):
        origin = f"{path}:{n}"
        if "messages" in obj:
            if not isinstance(obj["messages"], list) or not obj["messages"]:
                raise DataError(str(path), n, "field 'messages' must be a non-empty list of {role, content}")
            out.append(Conversation(tuple(obj["messages"]), origin))
        else:
            out.append(Example(_field(path, n, obj, "prompt"), _field(path, n, obj, "completion"), origin=origin))
    return out


@dataclass(frozen=True)
class Conversation:
    """A multi-turn SFT example in chat form."""

    messages: tuple
    origin: str = ""

    @property
    def prompt(self) -> str:
        """The split key: every message before the first assistant reply, the conversation's prompt (the first
        message alone put all conversations opening with one system message on one side). Conversations that
        open alike land on the same side, so a held-out opening is never trained on in another conversation."""
        first = next((i for i, m in enumerate(self.messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                     len(self.messages))
        return json.dumps(self.messages[:max(first, 1)])


def load_pairs(path: str | Path) -> list[Pair]:
    """Preference rows {"prompt", "chosen", "rejected"}; identical chosen and rejected is a DataError."""
    pairs = []
    for n, obj in read_jsonl(path):
        p, c, r = (_field(path, n, obj, k) for k in ("prompt", "chosen", "rejected"))
        if c == r:
            raise DataError(str(path), n, "'chosen' and 'rejected' are identical (the pair teaches nothing)")
        pairs.append(Pair(p, c, r, f"{path}:{n}"))
    return pairs


# ------------------------------------------------------------------------------- verifiable tasks


def _task_example(task: str, rng: random.Random) -> tuple[str, str]:
    if task == "add":
        a, b = rng.randint(0, 19), rng.randint(0, 19)
        return f"{a}+{b}=", str(a + b)
    if task == "sort":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))
        return f"sort {digits}", "".join(sorted(digits))
    if task == "reverse":
        word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 5)))
        return f"reverse {word}", word[::-1]
    raise ValueError(f"unknown task {task!r}; built-in tasks: {', '.join(TASKS)}")


def task_examples(tasks: tuple[str, ...] = TASKS, n: int = 3000, seed: int = 0, noise: float = 0.0) -> list[Example]:
    """Up to ``n`` distinct prompts, cycling through ``tasks``, with their right answers; with ``noise``
    > 0 that share of the demonstrations is replaced by a plausible wrong answer (imperfect
    demonstrations, which imitation copies and a reward can correct)."""
    rng = random.Random(seed)
    noise_rng = random.Random(seed + 2)
    seen, out = set(), []
    for i in range(20 * n):
        if len(out) >= n:
            break
        task = tasks[i % len(tasks)]
        prompt, answer = _task_example(task, rng)
        if prompt not in seen:
            seen.add(prompt)
            ex = Example(prompt, answer, task, f"builtin:{task}")
            if noise and noise_rng.random() < noise:
                ex = Example(prompt, _wrong_answer(ex, noise_rng), task, ex.origin)
            out.append(ex)
    return out


def exact_match(completion: str, answer: str) -> bool:
    """The verifiable reward: the completion equals the answer, both stripped of surrounding whitespace (a
    JSONL reference " yes" is matched by a model that says " yes")."""
    return completion.strip() == answer.strip()


def solve_task(prompt: str) -> str | None:
    """The right answer to a built-in task prompt, computed from the prompt; None if it is not one."""
    if prompt.endswith("=") and "+" in prompt:
        a, _, b = prompt[:-1].partition("+")
        return str(int(a) + int(b)) if a.isdigit() and b.isdigit() else None
    verb, _, arg = prompt.partition(" ")
    if verb == "sort" and arg:
        return "".join(sorted(arg))
    if verb == "reverse" and arg:
        return arg[::-1]
    return None


def task_reward(prompt: str, response: str) -> float:
    """The verifiable reward of the built-in tasks: 1.0 for the exact right answer, else 0.0."""
    answer = solve_task(prompt)
    if answer is None:
        raise ValueError(f"task_reward: {prompt!r} is not a built-in task prompt ({', '.join(TASKS)})")
    return float(exact_match(response, answer))


def _wrong_answer(ex: Example, rng: random.Random) -> str:
    """A plausible but wrong answer to a task example."""
    if ex.task == "add":
        return str(int(ex.completion) + rng.choice((-2, -1, 1, 2, 10)))
    if ex.task in ("sort", "reverse"):
        source = ex.prompt.split(" ", 1)[1]
        chars = list(ex.completion)
        candidates = [source, ex.completion[1:], ex.completion + ex.completion[-1]]
        i = rng.randrange(len(chars) - 1)
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
        candidates.append("".join(chars))
        wrong = [c for c in candidates if c != ex.completion]
        return rng.choice(wrong)
    raise ValueError(f"no wrong-answer generator for task {ex.task!r}")


def task_pairs(tasks: tuple[str, ...] = TASKS, n: int = 3000, seed: int = 0) -> list[Pair]:
    """Preferences over task answers: right answer chosen, a plausible wrong one rejected."""
    rng = random.Random(seed + 1)
    pairs = []
    for ex in task_examples(tasks, n, seed):
        wrong = _wrong_answer(ex, rng)
        if wrong != ex.completion:
            pairs.append(Pair(ex.prompt, ex.completion, wrong, ex.origin))
    return pairs


# ------------------------------------------------------------------------- stdlib docstring QA


def _first_sentence(doc: str, max_chars: int) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    end = para.find(". ")
    sentence = para if end < 0 else para[:end + 1]
    return sentence[:max_chars]


def docstring_examples(n: int = 2000, max_chars: int = 80, heldout_fraction: float = 0.2) -> list[Example]:
    """'What does <qualified name> do?' answered with the first sentence of its docstring. Functions the
    evaluation stage reserves (``pyllm.eval.builtin.is_heldout``) are always on the held-out side."""
    from pyllm.data.stdlib import stdlib_docstrings
    from pyllm.eval.builtin import is_heldout as eval_heldout

    out = []
    for name, doc in stdlib_docstrings():
        answer = _first_sentence(doc, max_chars)
        if len(answer) >= 10 and answer.isascii():
            held = eval_heldout(name) or is_heldout(name, heldout_fraction)
            out.append(Example(f"What does {name} do?", answer, "docstrings", "builtin:docstrings", held))
        if len(out) >= n:
            break
    return out


def docstring_pairs(n: int = 2000, max_chars: int = 80, seed: int = 0) -> list[Pair]:
    """The right docstring sentence preferred over another function's (drawn at random)."""
    examples = docstring_examples(n, max_chars)
    rng = random.Random(seed)
    pairs = []
    for ex in examples:
        other = examples[rng.randrange(len(examples))].completion
        if other != ex.completion:
            pairs.append(Pair(ex.prompt, ex.completion, other, ex.origin, ex.heldout))
    return pairs


BUILTIN_EXAMPLES: dict[str, Callable[..., list[Example]]] = {
    "tasks": lambda seed=0: task_examples(seed=seed),
    "noisy_tasks": lambda seed=0: task_examples(seed=seed, noise=0.5),
    "add": lambda seed=0: task_examples(("add",), seed=seed),
    "sort": lambda seed=0: task_examples(("sort",), seed=seed),
    "reverse": lambda seed=0: task_examples(("reverse",), seed=seed),
    "docstrings": lambda seed=0: docstring_examples(),
    "judge_tasks": lambda seed=0: _judge_task_examples(seed),
}


def _judge_task_examples(seed: int) -> list[Example]:
    """Judge-training data from the task preferences (see pyllm.post.judge.judge_examples)."""
    from .judge import judge_examples

    return judge_examples(task_pairs(seed=seed), seed=seed)
BUILTIN_PAIRS: dict[str, Callable[..., list[Pair]]] = {
    "tasks": lambda seed=0: task_pairs(seed=seed),
    "docstrings": lambda seed=0: docstring_pairs(seed=seed),
}


def resolve(source: str, table: dict, loader: Callable, seed: int = 0) -> list:
    """``builtin:<name>`` from ``table`` or a JSONL path read by ``loader``."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in table:
            raise ValueError(f"unknown built-in data set {source!r}; choose from "
                             f"{', '.join('builtin:' + k for k in table)} or give a .jsonl path")
        return table[name](seed=seed)
    return loader(source)
