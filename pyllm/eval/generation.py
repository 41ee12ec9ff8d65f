"""Generation tasks: generate until a stop string, then score by exact match after normalisation or by
a Python checker; with several samples per item, pass@k (the unbiased estimator of Chen et al. 2021,
"Evaluating Large Language Models Trained on Code", eq. 1).

Token generation is ``pyllm.model.generate.generate``; stop *strings* are handled here: the response is
decoded and cut before the first stop string (a stop string that is a single token also ends
generation early, through ``stop_tokens``).
"""

from __future__ import annotations

import importlib
import math
import re
import string
from collections.abc import Callable, Sequence

from tqdm import tqdm

from .parallel import all_reduce_sums
from .tasks import Task, TaskError


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for s in stop:
        if s:
            at = text.find(s)
            if at != -1:
                end = min(end, at)
    return text[:end]


def generate_text(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int | None = None,
                  seed: int | None = None) -> list[str]:
    """Responses to ``prompts`` (each prefixed with eos, as in scoring; left-truncated so that prompt
    plus ``max_new_tokens`` fit the model's context), cut at the first eos or stop string."""
    from pyllm.model.generate import generate

    room = model.cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"generate_text: max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {model.cfg.max_seq_len}")
    stop_tokens = {tokenizer.eos_id}
    for s in stop:
        ids = tokenizer.encode(s)
        if len(ids) == 1:  # a one-token stop string can end generation early
            stop_tokens.add(ids[0])
    prompt_ids = [[tokenizer.eos_id, *tokenizer.encode(p)][-room:] for p in prompts]
    outs = generate(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p if top_p < 1.0 else None, stop_tokens=sorted(stop_tokens), seed=seed)
    texts = []
    for ids in outs:
        if tokenizer.eos_id in ids:
            ids = ids[:ids.index(tokenizer.eos_id)]
        texts.append(cut_at_stop(tokenizer.decode(ids), stop))
    return texts


def normalize(text: str, steps: Sequence[str]) -> str:
    for step in steps:
        if step == "strip":
            text = text.strip()
        elif step == "lower":
            text = text.lower()
        elif step == "collapse_whitespace":
            text = " ".join(text.split())
        elif step == "strip_punctuation":
            text = text.translate(str.maketrans("", "", string.punctuation))
        elif step == "last_number":
            numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
            text = numbers[-1] if numbers else ""
        else:
            raise ValueError(f"unknown normalisation {step!r}")
    return text


def exact_match(response: str, references: Sequence[str], steps: Sequence[str]) -> bool:
    got = normalize(response, steps)
    return any(got == normalize(r, steps) for r in references)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 <= c={c} <= n={n} and 1 <= k={k} <= n")
    if n - c < k:
        return 1.0
    # product form of the binomial ratio, stable for large n
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def load_checker(spec: str) -> Callable[[dict, str], bool]:
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"checker {spec!r} cannot be loaded: {e}") from None


def _run_checker(check, item, response: str) -> bool:
    try:
        return bool(check(item.doc, response))
    except Exception as e:  # user code: say which item it failed on
        raise TaskError(f"{item.where}: checker failed on response {response!r}: {type(e).__name__}: {e}") from e


def evaluate_generation(model, tokenizer, task: Task, *, batch_size: int = 16, rank: int = 0, world_size: int = 1,
                        progress: bool = False, checker: Callable[[dict, str], bool] | None = None) -> dict:
    """exact_match (or checker) accuracy of the first sample per item, plus pass@k when sampling."""
    cfg = task.cfg
    if cfg.kind != "generation":
        raise ValueError(f"task {task.name!r} is {cfg.kind}, not generation")
    check = checker or (load_checker(cfg.checker) if cfg.checker else None)
    indices = list(range(rank, len(task.items), world_size))
    first_correct = 0.0
    pass_sums = dict.fromkeys(cfg.pass_k, 0.0)
    per_call = max(1, batch_size // cfg.num_samples)  # items per generate call: ~batch_size rows
    for start in tqdm(range(0, len(indices), per_call), desc=task.name, unit="call", disable=not progress):
        batch = indices[start:start + per_call]
        prompts = [task.context(i) for i in batch for _ in range(cfg.num_samples)]
        responses = generate_text(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens, stop=cfg.stop,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.sample_seed * 1_000_003 + batch[0] if cfg.temperature > 0 else None)
        for j, i in enumerate(batch):
            item = task.items[i]
            samples = responses[j * cfg.num_samples:(j + 1) * cfg.num_samples]
            ok = [_run_checker(check, item, r) if check else exact_match(r, item.references, cfg.normalize)
                  for r in samples]
            first_correct += ok[0]
            for k in cfg.pass_k:
                pass_sums[k] += pass_at_k(len(ok), sum(ok), k)
    *sums, n = all_reduce_sums([first_correct, *pass_sums.values(), len(indices)], world_size)
    metric = "check" if check else "exact_match"
    out = {metric: sums[0] / n, "n": int(n)}
    if cfg.num_samples > 1:
        out.update({f"pass@{k}": s / n for k, s in zip(cfg.pass_k, sums[1:])})
    return out
