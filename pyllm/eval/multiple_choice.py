"""Multiple-choice tasks scored by log-likelihood, as lm-evaluation-harness scores them.

Each choice is scored as the summed log-probability of ``target_delimiter + choice`` after the prompt.
- ``acc``: the choice with the highest summed log-probability is the gold one;
- ``acc_norm``: highest log-probability divided by the choice's length in characters (lm-eval's
  acc_norm: removes the bias towards short choices);
- ``acc_bytes``: the same, divided by the choice's length in UTF-8 bytes.
Ties go to the first choice (numpy argmax, as lm-eval). All choices of an item are scored in one batch
that runs the shared prompt once (``Scorer.choices``).
"""

from __future__ import annotations

from tqdm import tqdm

from .loglik import Scorer, encode_pair, evaluating
from .parallel import all_reduce_sums
from .tasks import Task

METRICS = ("acc", "acc_norm", "acc_bytes")


def argmax(values) -> int:
    """Index of the first maximum."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def predictions(logprobs: list[float], choices: list[str]) -> dict[str, int]:
    """The choice each metric picks, from the summed log-probabilities of the choices."""
    return {
        "acc": argmax(logprobs),
        "acc_norm": argmax([lp / len(c) for lp, c in zip(logprobs, choices)]),
        "acc_bytes": argmax([lp / len(c.encode("utf-8")) for lp, c in zip(logprobs, choices)]),
    }


def score_item(scorer: Scorer, tokenizer, task: Task, index: int) -> list[float]:
    """Summed log-probability of each choice of item ``index`` after its (k-shot) context."""
    item, context = task.items[index], task.context(index)
    pairs = [encode_pair(tokenizer, context, task.cfg.target_delimiter + c) for c in item.choices]
    ctx = pairs[0][0]  # the context's tokens do not depend on the choice
    return [s.logprob for s in scorer.choices(ctx, [cont for _, cont in pairs])]


def evaluate_multiple_choice(model, tokenizer, task: Task, *, batch_size: int = 16, rank: int = 0,
                             world_size: int = 1, progress: bool = False) -> dict:
    """acc, acc_norm, acc_bytes (means over items) and the item count."""
    if task.cfg.kind != "multiple_choice":
        raise ValueError(f"task {task.name!r} is {task.cfg.kind}, not multiple_choice")
    scorer = Scorer(model, batch_size=batch_size)
    correct = dict.fromkeys(METRICS, 0.0)
    indices = range(rank, len(task.items), world_size)
    with evaluating(model):
        for i in tqdm(indices, desc=task.name, unit="item", disable=not progress):
            item = task.items[i]
            for metric, pred in predictions(score_item(scorer, tokenizer, task, i), item.choices).items():
                correct[metric] += pred == item.gold
    *sums, n = all_reduce_sums([*correct.values(), len(indices)], world_size)
    return {**{m: s / n for m, s in zip(METRICS, sums)}, "n": int(n)}
