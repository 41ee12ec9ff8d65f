"""Run a list of tasks on one model, and build the ``eval_fn`` the Trainer calls during training."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from pyllm.model import Transformer

from .builtin import BUILTIN_TASKS, builtin_task
from .generation import evaluate_generation
from .loglik import evaluating
from .multiple_choice import evaluate_multiple_choice
from .parallel import dist_rank_world
from .perplexity import perplexity
from .tasks import Task, TaskError, load_task


def resolve_task(spec: str | Task, limit: int | None = None, num_fewshot: int | None = None) -> Task:
    """A Task from a built-in task name or the path of a task file (``limit`` and ``num_fewshot``
    override theirs); a Task object is used as given."""
    if isinstance(spec, Task):
        return spec
    overrides = {k: v for k, v in (("limit", limit), ("num_fewshot", num_fewshot)) if v is not None}
    if spec in BUILTIN_TASKS:
        if spec == "stdlib_ppl":
            overrides.pop("num_fewshot", None)
        return builtin_task(spec, **overrides)
    if Path(spec).suffix in (".yaml", ".yml", ".json"):
        return load_task(spec, **overrides)
    raise TaskError(f"task {spec!r} is neither a built-in task ({', '.join(BUILTIN_TASKS)}) "
                    f"nor a task file (.yaml, .yml, .json)")


def unwrap(model):
    """The pyllm Transformer itself, or the first one inside a wrapper (DDP, torch.compile, PPO's
    policy-with-value, a reward model's body)."""
    found = next((m for m in model.modules() if isinstance(m, Transformer)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} is not a pyllm Transformer and holds none")
    return found


def run_task(model, tokenizer, task: Task, *, batch_size: int = 16, distributed: bool = False,
             progress: bool = False) -> dict:
    rank, world = dist_rank_world() if distributed else (0, 1)
    kw = dict(batch_size=batch_size, rank=rank, world_size=world, progress=progress)
    if task.cfg.kind == "multiple_choice":
        return evaluate_multiple_choice(model, tokenizer, task, **kw)
    if task.cfg.kind == "generation":
        return evaluate_generation(model, tokenizer, task, **kw)
    return perplexity(model, tokenizer, [it.text for it in task.items], **kw)


def run_tasks(model, tokenizer, tasks: Sequence[str | Task], *, limit: int | None = None,
              num_fewshot: int | None = None, batch_size: int = 16, distributed: bool = False,
              progress: bool = False) -> dict[str, dict]:
    """{task name: metrics} for each task (built-in name, task file path or Task). The model runs in
    eval mode (restored afterwards). ``distributed``: shard items over the torch.distributed ranks;
    every rank must call this and gets the same results."""
    model = unwrap(model)
    resolved = [resolve_task(t, limit, num_fewshot) for t in tasks]  # fail on a bad task before any work
    with evaluating(model):
        return {t.name: run_task(model, tokenizer, t, batch_size=batch_size, distributed=distributed,
                                 progress=progress) for t in resolved}


def make_eval_fn(tokenizer, *, texts: Sequence[str] | None = None, tasks: Sequence[str | Task] = (),
                 limit: int | None = None, batch_size: int = 16, distributed: bool = True,
                 ) -> Callable[[torch.nn.Module], dict[str, float]]:
    """An ``eval_fn(model) -> {name: float}`` for the Trainer: perplexity metrics of held-out ``texts``
    (keys "val/bits_per_byte", ...) and each task's metrics (keys "<task>/<metric>"). Tasks are loaded
    once, here. With ``distributed`` (the default) and an initialised process group, the items are
    sharded over the ranks and the sums all-reduced: the Trainer calls eval_fn on every rank, as this
    requires. Without a process group it evaluates everything in-process."""
    if texts is None and not tasks:
        raise ValueError("make_eval_fn: give held-out texts, tasks, or both")
    resolved = [resolve_task(t, limit) for t in tasks]
    texts = list(texts) if texts is not None else None

    def eval_fn(model) -> dict[str, float]:
        inner = unwrap(model)
        out = {}
        if texts is not None:
            rank, world = dist_rank_world() if distributed else (0, 1)
            ppl = perplexity(inner, tokenizer, texts, batch_size=batch_size, rank=rank, world_size=world)
            out.update({f"val/{k}": float(v) for k, v in ppl.items()
                        if k in ("bits_per_byte", "token_perplexity", "nll_per_token")})
        for name, metrics in run_tasks(inner, tokenizer, resolved, batch_size=batch_size,
                                       distributed=distributed).items():
            out.update({f"{name}/{k}": float(v) for k, v in metrics.items() if k != "n"})
        return out

    return eval_fn
