"""Evaluation tasks: a small file format, validation with errors that name the file and item, and
k-shot prompt construction.

A task file is YAML or JSON (``.yaml``, ``.yml``, ``.json``) holding the ``TaskConfig`` fields, e.g.::

    name: capitals
    kind: multiple_choice          # multiple_choice | generation | perplexity
    data: capitals.jsonl           # one JSON object per line; relative to the task file
    fewshot_data: capitals_dev.jsonl
    num_fewshot: 2
    template: "Q: What is the capital of {{country}}?\\nA:"
    choices: options               # field holding the list of choice strings
    answer: label                  # field holding the index of the right choice

Templates are Jinja2 (the syntax lm-evaluation-harness task files use), rendered with the item's fields;
an undefined field is an error, not an empty string.
"""

from __future__ import annotations

import json
import random
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import jinja2
import yaml

from pyllm.data.jsonl import JsonLinesError, read_json_lines
from pyllm.typecheck import type_problem, unwrap_optional

KINDS = ("multiple_choice", "generation", "perplexity")
NORMALIZERS = ("strip", "lower", "collapse_whitespace", "strip_punctuation", "last_number")


class TaskError(ValueError):
    """A task definition or data item is invalid; the message names the file and the item."""


@dataclass
class TaskConfig:
    """One evaluation task."""

    name: str
    """Name used in results and reports."""
    kind: str
    """"multiple_choice" (log-likelihood of each choice), "generation" (generate, then match or check)
    or "perplexity" (rolling-window perplexity / bits-per-byte of a text field)."""
    data: str = ""
    """JSONL file of items to evaluate (relative paths are resolved against the task file)."""
    template: str = ""
    """Jinja2 template rendering an item's prompt (the context). Unused for perplexity."""
    choices: str = "choices"
    """multiple_choice: item field holding the list of choice strings."""
    answer: str = "answer"
    """multiple_choice: field with the index of the right choice; generation: field with the reference
    answer (a string, or a list of accepted strings)."""
    text: str = "text"
    """perplexity: item field holding the document text."""
    fewshot_data: str | None = None
    """JSONL file the k-shot examples are drawn from; None: other items of ``data`` (never the evaluated one)."""
    num_fewshot: int = 0
    """Examples placed before each prompt."""
    fewshot_seed: int = 1234
    """Seed of the example draw; each item's draw depends only on (seed, item index)."""
    description: str = ""
    """Text placed before the few-shot examples."""
    target_delimiter: str = " "
    """Between a prompt and its answer (few-shot examples, and each choice of multiple_choice)."""
    fewshot_delimiter: str = "\n\n"
    """Between consecutive examples and before the evaluated prompt."""
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    """generation: strings that end a response (the response is cut before the first one); a single string
    is one stop string (as in lm-evaluation-harness's ``until``), never a list of its characters."""
    max_new_tokens: int = 64
    """generation: most tokens generated per response."""
    normalize: list[str] = field(default_factory=lambda: ["strip"])
    """generation: normalisations applied to response and reference before exact match, in order
    (see NORMALIZERS)."""
    checker: str | None = None
    """generation: "module:function" called as function(item: dict, response: str) -> bool instead of
    exact match."""
    num_samples: int = 1
    """generation: responses per item; with more than one, pass@k is reported."""
    temperature: float = 0.0
    """generation: 0 is greedy decoding; > 0 samples."""
    top_p: float = 1.0
    """generation: nucleus sampling threshold (sampled generation only)."""
    sample_seed: int = 0
    """generation: seed of sampled generation (each batch's draw depends only on it and the batch's first item)."""
    pass_k: list[int] = field(default_factory=lambda: [1])
    """generation: the k of each pass@k reported (each at most num_samples)."""
    limit: int | None = None
    """Evaluate only the first ``limit`` items."""

    def __post_init__(self):
        for f in fields(self):  # types first: a task file is YAML, and the checks below compare values
            setattr(self, f.name, _typed(self.name, f.name, getattr(self, f.name), _HINTS[f.name]))
        checks = [
            (bool(self.name), "field 'name' must be a non-empty string"),
            (self.kind in KINDS, f"field 'kind'={self.kind!r} must be one of {', '.join(KINDS)}"),
            (self.kind == "perplexity" or bool(self.template), "field 'template' is required for this kind"),
            (self.num_fewshot >= 0, f"field 'num_fewshot'={self.num_fewshot} must be >= 0"),
            (self.kind != "perplexity" or self.num_fewshot == 0, "perplexity tasks take no few-shot examples"),
            (self.max_new_tokens >= 1, f"field 'max_new_tokens'={self.max_new_tokens} must be >= 1"),
            (self.num_samples >= 1, f"field 'num_samples'={self.num_samples} must be >= 1"),
            (self.temperature >= 0, f"field 'temperature'={self.temperature} must be >= 0"),
            (self.num_samples == 1 or self.temperature > 0,
             "num_samples > 1 needs temperature > 0 (greedy samples are all the same)"),
            (all(1 <= k <= self.num_samples for k in self.pass_k),
             f"field 'pass_k'={self.pass_k}: each k must be in [1, num_samples={self.num_samples}]"),
            (all(n in NORMALIZERS for n in self.normalize),
             f"field 'normalize'={self.normalize}: use names from {', '.join(NORMALIZERS)}"),
            (self.checker is None or ":" in self.checker,
             f"field 'checker'={self.checker!r} must be 'module:function'"),
            (self.limit is None or self.limit >= 1, f"field 'limit'={self.limit} must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise TaskError(f"task {self.name!r}: {msg}")


_HINTS = typing.get_type_hints(TaskConfig)


def _typed(task, name: str, value, hint):
    """``value`` of field ``name`` checked against its annotation: an int is a float too, and a single value is
    a one-element list (``stop: "Question:"`` is one stop string); anything else is a TaskError."""
    if (want := type_problem(value, hint, scalar_as_list=True)) is not None:
        raise TaskError(f"task {task!r}: field {name!r} must be {want}, got {value!r}")
    hint = unwrap_optional(hint)
    if value is None or hint is not float and typing.get_origin(hint) is not list:
        return value
    if hint is float:
        return float(value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class Item:
    """One rendered item: the prompt, the choices / reference, and where it came from (for errors)."""

    doc: dict
    where: str
    """"file:line" (or "builtin:name#index") of the item, for messages."""
    prompt: str = ""
    choices: list[str] = field(default_factory=list)
    gold: int = -1
    references: list[str] = field(default_factory=list)
    text: str = ""

    @property
    def target(self) -> str:
        """The answer text a few-shot example shows."""
        return self.choices[self.gold] if self.choices else self.references[0]


_JINJA = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def render(template: str, doc: dict, where: str) -> str:
    try:
        return _JINJA.from_string(template).render(**doc)
    except jinja2.UndefinedError as e:
        raise TaskError(f"{where}: template refers to a missing field ({e.message})") from None
    except jinja2.TemplateError as e:
        raise TaskError(f"{where}: bad template: {e}") from None


def make_item(cfg: TaskConfig, doc: dict, where: str) -> Item:
    """Validate one raw item against the task config and render it."""
    if not isinstance(doc, dict):
        raise TaskError(f"{where}: an item must be a JSON object, got {type(doc).__name__}")
    item = Item(doc=doc, where=where)
    if cfg.kind == "perplexity":
        item.text = _field(doc, cfg.text, where, str)
        return item
    item.prompt = render(cfg.template, doc, where)
    if cfg.kind == "multiple_choice":
        choices = _field(doc, cfg.choices, where, list)
        if not choices:
            raise TaskError(f"{where}: field '{cfg.choices}' is an empty list of choices")
        if not all(isinstance(c, str) and c for c in choices):
            raise TaskError(f"{where}: field '{cfg.choices}' must hold non-empty strings (acc_norm divides by "
                            f"their length), got {choices}")
        gold = _field(doc, cfg.answer, where, int)
        if isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise TaskError(f"{where}: answer index {cfg.answer}={gold} is out of range for {len(choices)} choices")
        item.choices, item.gold = choices, gold
    else:
        ref = _field(doc, cfg.answer, where, (str, list))
        refs = [ref] if isinstance(ref, str) else ref
        if not refs or not all(isinstance(r, str) for r in refs):
            raise TaskError(f"{where}: field '{cfg.answer}' must be a string or a non-empty list of strings")
        item.references = refs
    return item


def _field(doc: dict, name: str, where: str, types):
    if name not in doc:
        raise TaskError(f"{where}: missing field '{name}' (item has {sorted(doc)})")
    value = doc[name]
    if not isinstance(value, types):
        want = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise TaskError(f"{where}: field '{name}' must be {want}, got {type(value).__name__}")
    return value


def read_jsonl(path: Path) -> list[tuple[dict, str]]:
    """(object, "file:line") for each non-blank line of a JSONL file. A line may hold any JSON value:
    ``make_item`` rejects one that is not an object (the items evaluated, and every item when the few-shot
    examples come from this file)."""
    if not path.exists():
        raise TaskError(f"{path}: data file not found")
    if not path.is_file():
        raise TaskError(f"{path}: data is not a file (a JSONL file of items)")
    try:
        return [(doc, f"{path}:{n}") for n, doc in read_json_lines(path, objects=False)]
    except JsonLinesError as e:
        raise TaskError(str(e)) from None


class Task:
    """A validated task: the config, its items and its few-shot pool, ready to build prompts."""

    def __init__(self, cfg: TaskConfig, docs: list[tuple[dict, str]],
                 fewshot_docs: list[tuple[dict, str]] | None = None):
        self.cfg = cfg
        if not docs:
            raise TaskError(f"task {cfg.name!r}: no items")
        self.items = [make_item(cfg, d, w) for d, w in (docs[:cfg.limit] if cfg.limit else docs)]
        # The pool is the few-shot split when there is one; else every item of the file (not only the first
        # ``limit``: an item's examples must not depend on the limit), and `fewshot_examples` then excludes
        # the item being evaluated.
        self._separate_pool = fewshot_docs is not None
        if fewshot_docs is not None:
            self.fewshot_pool = [make_item(cfg, d, w) for d, w in fewshot_docs]
        else:
            self.fewshot_pool = self.items + [make_item(cfg, d, w) for d, w in docs[len(self.items):]] \
                if cfg.num_fewshot else self.items
        need = cfg.num_fewshot + (0 if self._separate_pool else 1)
        if cfg.num_fewshot and len(self.fewshot_pool) < need:
            raise TaskError(f"task {cfg.name!r}: num_fewshot={cfg.num_fewshot} but the few-shot pool has only "
                            f"{len(self.fewshot_pool) - (need - cfg.num_fewshot)} usable items")

    @property
    def name(self) -> str:
        return self.cfg.name

    def fewshot_examples(self, index: int) -> list[Item]:
        """The k examples for item ``index``: drawn with a generator seeded by (seed, index), so the
        prompt of an item does not depend on evaluation order or sharding; never the item itself, nor
        a pool entry identical to it (same raw object or same prompt)."""
        k = self.cfg.num_fewshot
        if k == 0:
            return []
        item = self.items[index]
        rng = random.Random(f"{self.cfg.fewshot_seed}:{index}")
        candidates = [j for j, ex in enumerate(self.fewshot_pool)
                      if not (ex is item or ex.doc == item.doc or ex.prompt == item.prompt)]
        if len(candidates) < k:
            raise TaskError(f"{item.where}: only {len(candidates)} few-shot examples differ from this item, "
                            f"num_fewshot={k}")
        return [self.fewshot_pool[j] for j in rng.sample(candidates, k)]

    def context(self, index: int) -> str:
        """The full prompt for item ``index``: description, k examples, then the item's prompt."""
        cfg = self.cfg
        shots = "".join(ex.prompt + cfg.target_delimiter + ex.target + cfg.fewshot_delimiter
                        for ex in self.fewshot_examples(index))
        return cfg.description + shots + self.items[index].prompt


def load_task(path: str | Path, **overrides) -> Task:
    """Read a task file (YAML or JSON) and its data. ``overrides`` replace config fields (e.g. limit)."""
    path = Path(path)
    if not path.exists():
        raise TaskError(f"{path}: task file not found")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise TaskError(f"{path}: cannot parse task file ({e})") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: a task file must hold a mapping of TaskConfig fields")
    if raw.get("kind") == "perplexity":
        overrides = {k: v for k, v in overrides.items() if k != "num_fewshot"}  # not a prompt task
    raw = {**raw, **overrides}
    known = {f.name for f in fields(TaskConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TaskError(f"{path}: unknown field(s) {unknown}; valid fields: {sorted(known)}")
    for required in ("name", "kind", "data"):
        if not raw.get(required):
            raise TaskError(f"{path}: missing field '{required}'")
    try:
        cfg = TaskConfig(**raw)
    except TaskError as e:
        raise TaskError(f"{path}: {e}") from None
    except TypeError as e:
        raise TaskError(f"{path}: {e}") from None
    docs = read_jsonl(path.parent / cfg.data)
    fewshot = read_jsonl(path.parent / cfg.fewshot_data) if cfg.fewshot_data else None
    return Task(cfg, docs, fewshot)
