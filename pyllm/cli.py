"""The ``pyllm`` command: a thin dispatcher. Each subcommand lives beside the API it drives and exposes
``main(argv: list[str]) -> int``; it is imported only when invoked, so one stage's optional
dependencies never slow down or break another's."""

from __future__ import annotations

import importlib
import os
import re
import sys
import warnings
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent

COMMANDS = {
    "info": ("pyllm.info", "show versions, devices and which op backends are available"),
    "pipeline": ("pyllm.pipeline", "run every stage end to end on the built-in default and write a report"),
    "data": ("pyllm.data.cli", "curate text, train a BPE tokenizer and pack token shards"),
    "train": ("pyllm.train.cli", "pretrain a model"),
    "plan": ("pyllm.train.plan", "size a model and its data for a compute budget"),
    "sft": ("pyllm.post.cli", "supervised fine-tuning"),
    "rm": ("pyllm.post.cli", "train a reward model"),
    "dpo": ("pyllm.post.cli", "direct preference optimisation"),
    "ppo": ("pyllm.post.cli", "RLHF with PPO"),
    "grpo": ("pyllm.post.cli", "group relative policy optimisation"),
    "eval": ("pyllm.eval.cli", "evaluate a checkpoint (perplexity, bits-per-byte, tasks)"),
    "bench": ("pyllm.benchmarks.__main__", "run the benchmark suite"),
}

# what running an interrupted command again does
RESUMES = {**{stage: "resumes from its last checkpoint" for stage in ("train", "sft", "rm", "dpo", "ppo", "grpo")},
           "pipeline": "skips the finished stages and resumes the interrupted one",
           "data": "skips the finished stages"}


# commands whose options are spelled with dashes (--out-dir); train and the post-training stages take config keys,
# which accept both spellings already
DASHED = ("info", "pipeline", "data", "plan", "eval", "bench")
_UNDERSCORED_OPTION = re.compile(r"^--[a-z0-9]+(?:_[a-z0-9]+)+(?==|$)")


def dashed(argv: list[str]) -> list[str]:
    """``--out_dir x`` as ``--out-dir x`` (and ``--out_dir=x``): a user of ``pyllm train --max_steps`` types it;
    these commands have no option spelled with an underscore, so nothing else changes. Tokens after ``--`` are
    left as they are."""
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        out.append(_UNDERSCORED_OPTION.sub(lambda m: m.group().replace("_", "-"), arg, count=1))
    return out


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: pyllm <command> [options]\n\ncommands:\n" + "\n".join(lines)


def warning_formatter(command: str):
    """warnings.formatwarning for the command line: pyllm's own warnings as one line a user reads,
    "pyllm train: warning: <message>", instead of Python's "<path>:<line>: RuntimeWarning: <message>"
    followed by a source line; warnings from other packages keep Python's format (their origin helps)."""
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        try:
            ours = Path(filename).resolve().is_relative_to(PACKAGE)
        except (OSError, ValueError):
            ours = False
        if ours:
            return f"pyllm {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)

    return format_warning


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"pyllm: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    previous, warnings.formatwarning = warnings.formatwarning, warning_formatter(name)
    try:
        module = importlib.import_module(COMMANDS[name][0])
        # post-training stages share one module; it learns which stage from the command name
        if name in DASHED:
            rest = dashed(rest)
        result = module.main([name, *rest]) if module.__name__ == "pyllm.post.cli" else module.main(rest)
    except KeyboardInterrupt:  # Ctrl-C: one line, not the traceback of wherever the run was
        resume = RESUMES.get(name, "")
        print(f"pyllm {name}: interrupted" + (f"; running the same command again {resume}" if resume else ""),
              file=sys.stderr)
        return 130  # the shell's code for SIGINT
    except BrokenPipeError:  # the reader went away (pyllm plan | head -1): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit flush does not fail again
        return 141  # the shell's code for SIGPIPE
    finally:
        warnings.formatwarning = previous
    return int(result or 0)  # a main that returns None succeeded


if __name__ == "__main__":
    sys.exit(main())
