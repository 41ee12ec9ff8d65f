"""Preference labelling: a judge decides which of two responses to a prompt is better.

Three judges behind one method, ``prefer(prompts, a, b, origins=None) -> list[float]`` (probability that a beats b;
``origins``, file:line per pair, name a pair in errors):
- ``RuleJudge``: a Python reward function r(prompt, response) (e.g. the exact-match checker of a task);
- ``RewardModelJudge``: a trained reward model (Bradley-Terry: P(a > b) = sigmoid(r_a - r_b));
- ``ModelJudge``: another pyllm model asked a principle-based question ("Which answer is more
  correct, A or B?"), AI feedback in the style of RLAIF / Constitutional AI (Bai et al. 2022). The
  probabilities of answering "A" and "B" are read from its next-token distribution, and each pair is
  asked in both orders and averaged, which cancels the judge's position bias.

``relabel(judge, pairs)`` orders each pair by the judge and reports how often the judge agrees with the
pairs' own labels (its agreement rate).
"""

from __future__ import annotations

import importlib
import math
import random
from dataclasses import replace
from typing import Callable

import torch

from pyllm.model import Transformer, load_model

from .chat import ChatTemplate
from .datasets import HELDOUT_FRACTION, Example, Pair, is_heldout, task_reward
from .heads import RewardModel
from .packing import encode_examples
from .sequences import collate

DEFAULT_PRINCIPLE = "Pick the correct and honest answer."


def shorten(text: str, n: int = 40) -> str:
    """``text`` quoted on one line, cut to ``n`` characters (for error messages)."""
    return repr(text[:n]) + ("..." if len(text) > n else "")


def reward_where(name, prompt: str, response: str, origin: str = "") -> str:
    """How an error names one reward: the reward's name, the example's ``origin`` (file:line) if known, the prompt
    and the response."""
    where = f"reward {name!r} on prompt {shorten(prompt)}, response {shorten(response)}"
    return f"{origin}: {where}" if origin else where


def finite_reward(value: float, where: str) -> float:
    """``value``, or a one-line ValueError when it is nan/inf (a nan reward would otherwise make every weight nan,
    or silently swap a judged pair)."""
    if not math.isfinite(value):
        raise ValueError(f"{where} returned {value}; rewards must be finite numbers")
    return value


def rule_score(rule: Callable[[str, str], float], prompt: str, response: str, name: str | None = None,
               origin: str = "") -> float:
    """``rule(prompt, response)`` as a finite float. The rule is user code: a failure, a non-number or nan/inf
    is a one-line ValueError naming it (``reward_where``)."""
    where = reward_where(name or getattr(rule, "__qualname__", repr(rule)), prompt, response, origin)
    try:
        out = rule(prompt, response)
    except Exception as e:
        raise ValueError(f"{where} failed: {type(e).__name__}: {e}") from e
    try:
        value = float(out)
    except (TypeError, ValueError):
        raise ValueError(f"{where} returned {repr(out)[:60]}, not a number") from None
    return finite_reward(value, where)


def _origins(origins: list[str] | None, prompts) -> list[str]:
    """Each example's file:line, or "" for each when the caller has none."""
    return origins or [""] * len(prompts)


class RuleJudge:
    """Prefers the response a Python rule scores higher (ties: 0.5)."""

    def __init__(self, reward_fn: Callable[[str, str], float], name: str | None = None):
        self.reward_fn, self.name = reward_fn, name

    def prefer(self, prompts, a, b, origins=None) -> list[float]:
        out = []
        for p, x, y, o in zip(prompts, a, b, _origins(origins, prompts)):
            ra, rb = (rule_score(self.reward_fn, p, r, self.name, o) for r in (x, y))
            out.append(0.5 if ra == rb else float(ra > rb))
        return out


class RewardModelJudge:
    """P(a > b) = sigmoid(r(a) - r(b)) under a reward model."""

    def __init__(self, rm: RewardModel, template: ChatTemplate, max_len: int, batch_size: int = 64):
        self.rm, self.template, self.max_len, self.batch_size = rm, template, max_len, batch_size

    @torch.no_grad()
    def scores(self, prompts, responses, origins=None) -> torch.Tensor:
        """Reward of each (prompt, response), (N,) on the CPU; ``origins`` (file:line) name them in errors."""
        examples = [Example(p, r, origin=o) for p, r, o in zip(prompts, responses, _origins(origins, prompts))]
        enc = encode_examples(self.template, examples, self.max_len)
        device = self.rm.head.proj.weight.device
        out = []
        for s in range(0, len(enc), self.batch_size):
            b = collate(enc[s:s + self.batch_size], self.template.tokenizer.pad_id, device)
            out.append(self.rm(b["tokens"], b["attention"]).float().cpu())
        return torch.cat(out)

    def prefer(self, prompts, a, b, origins=None) -> list[float]:
        return torch.sigmoid(self.scores(prompts, a, origins) - self.scores(prompts, b, origins)).tolist()


def judge_question(principle: str, prompt: str, first: str, second: str) -> str:
    """The question a model judge is asked; it answers "A" (first is better) or "B"."""
    return f"{principle}\nQ: {prompt}\nA: {first}\nB: {second}\nBetter, A or B?"


def judge_examples(pairs: list[Pair], principle: str = DEFAULT_PRINCIPLE, seed: int = 0) -> list[Example]:
    """SFT data that teaches a model to judge: each pair asked in a random order, answered A or B. The
    split key is the pair's own prompt, so a pair held out here is held out everywhere."""
    rng = random.Random(seed)
    out = []
    for p in pairs:
        swap = rng.random() < 0.5
        first, second = (p.rejected, p.chosen) if swap else (p.chosen, p.rejected)
        held = p.heldout if p.heldout is not None else is_heldout(p.prompt, HELDOUT_FRACTION)
        out.append(Example(judge_question(principle, p.prompt, first, second), "B" if swap else "A", "judge",
                           p.origin, held))
    return out


class ModelJudge:
    """A pyllm language model asked which answer better follows ``principle``."""

    def __init__(self, model: Transformer, template: ChatTemplate, principle: str = DEFAULT_PRINCIPLE):
        self.model, self.template, self.principle = model, template, principle
        tok = template.tokenizer
        self.choice_ids = (tok.encode("A")[0], tok.encode("B")[0])

    def _question(self, prompt, first, second, origin) -> list[int]:
        text = judge_question(self.principle, prompt, first, second)
        ids = self.template.prompt_ids([{"role": "user", "content": text}])
        if len(ids) > self.model.cfg.max_seq_len:
            where = f"{origin}: " if origin else ""
            raise ValueError(f"{where}judge question for prompt {prompt[:40]!r} is {len(ids)} tokens, longer than "
                             f"the judge model's context ({self.model.cfg.max_seq_len}); shorten the principle")
        return ids

    @torch.no_grad()
    def _p_first(self, prompts, first, second, origins) -> list[float]:
        """P(the judge answers "A") renormalised over {A, B}, per pair, in one padded batch."""
        qs = [self._question(p, x, y, o) for p, x, y, o in zip(prompts, first, second, origins)]
        L = max(map(len, qs))
        device = self.model.head_weight.device
        tokens = torch.full((len(qs), L), self.template.tokenizer.pad_id, dtype=torch.long)
        for i, q in enumerate(qs):
            tokens[i, :len(q)] = torch.tensor(q)
        last = torch.tensor([len(q) - 1 for q in qs])
        logits = self.model(tokens.to(device)).float().cpu()  # (B, L, V); right padding is never attended
        pick = logits[torch.arange(len(qs)), last][:, list(self.choice_ids)]  # (B, 2)
        return torch.softmax(pick, dim=-1)[:, 0].tolist()

    def prefer(self, prompts, a, b, origins=None) -> list[float]:
        origins = _origins(origins, prompts)
        ab = self._p_first(prompts, a, b, origins)
        ba = self._p_first(prompts, b, a, origins)
        return [(x + (1.0 - y)) / 2.0 for x, y in zip(ab, ba)]


def relabel(judge, pairs: list[Pair], batch_size: int = 64) -> tuple[list[Pair], dict]:
    """Order every pair by the judge (its preferred response becomes ``chosen``; ties keep the order).
    Returns (pairs, {"judge_agreement": share agreeing with the original labels, "judge_ties": share tied,
    "judge_confidence": mean |P - 0.5| * 2})."""
    out, agree, ties, conf = [], 0, 0, 0.0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        probs = judge.prefer([p.prompt for p in chunk], [p.chosen for p in chunk], [p.rejected for p in chunk],
                             [p.origin for p in chunk])
        for p, prob in zip(chunk, probs):
            if math.isclose(prob, 0.5):
                ties += 1
                out.append(p)
                continue
            conf += abs(prob - 0.5) * 2
            if prob > 0.5:
                agree += 1
                out.append(p)
            else:
                out.append(replace(p, chosen=p.rejected, rejected=p.chosen))
    n = max(len(pairs), 1)
    return out, {"judge_agreement": agree / n, "judge_ties": ties / n, "judge_confidence": conf / n}


def load_python_function(spec: str) -> Callable:
    """"py:package.module:function" -> the function (a reward or rule f(prompt, response) -> float)."""
    _, _, target = spec.partition(":")
    module, _, name = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{spec!r}: cannot load function {name!r} from module {module!r} ({e}); "
                         "write it as py:package.module:function") from None
    if not callable(fn):
        raise ValueError(f"{spec!r}: {module}.{name} is not callable")
    return fn


def judge_from_spec(spec: str, template: ChatTemplate, seq_len: int, device, principle: str = DEFAULT_PRINCIPLE):
    """"rule" (built-in task checker), "py:module:function", "rm:<dir>" or "model:<dir>" -> a judge."""
    kind, _, path = spec.partition(":")
    if spec == "rule":
        return RuleJudge(task_reward, "rule")
    if kind == "py" and path:
        return RuleJudge(load_python_function(spec), spec)
    if kind == "rm" and path:
        return RewardModelJudge(RewardModel.load(path, device).eval(), template, seq_len)
    if kind == "model" and path:
        return ModelJudge(load_model(path, device).eval(), template, principle)
    raise ValueError(f"judge={spec!r}: use 'rule', 'py:module:function', 'rm:<reward model dir>' or "
                     "'model:<model dir>'")
