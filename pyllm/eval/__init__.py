"""pyllm.eval: perplexity and bits-per-byte, multiple-choice and generation tasks, reward-model judging,
task files, data-parallel evaluation, the Trainer's eval_fn, and an lm-evaluation-harness adapter
(``pyllm.eval.lm_eval_model``, imported only when used)."""

from .builtin import BUILTIN_TASKS, builtin_task, is_heldout
from .generation import cut_at_stop, evaluate_generation, exact_match, generate_text, normalize, pass_at_k
from .judge import judge_models, win_rate
from .loglik import Score, Scorer, encode_pair
from .multiple_choice import evaluate_multiple_choice, predictions
from .perplexity import perplexity, rolling_windows
from .report import markdown_table, write_report
from .runner import make_eval_fn, resolve_task, run_tasks
from .tasks import Task, TaskConfig, TaskError, load_task

__all__ = [
    "perplexity", "rolling_windows", "Scorer", "Score", "encode_pair", "run_tasks", "resolve_task", "make_eval_fn",
    "Task", "TaskConfig", "TaskError", "load_task", "BUILTIN_TASKS", "builtin_task", "is_heldout",
    "evaluate_multiple_choice", "predictions", "evaluate_generation", "generate_text", "cut_at_stop",
    "exact_match", "normalize", "pass_at_k", "win_rate", "judge_models", "markdown_table", "write_report",
]
