"""``pyllm sft | rm | dpo | ppo | grpo [--field value ...]``: build the stage's config and run it.

Options are the stage config's fields (``--data builtin:tasks``, ``--beta 0.1``, ``--model runs/sft/final``)
and any TrainConfig field (``--lr 1e-4``, ``--max_steps 100``, ``--model.n_layer 4`` for a fresh model),
which go into the config's ``train`` overrides. The held-out metrics before and after are printed as JSON;
bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import typing

from pyllm.train.cli import print_error
from pyllm.train.config import ConfigError, parse_overrides

from .datasets import DataError


def _stages():
    from .dpo import DPOConfig, dpo
    from .grpo import GRPOConfig, grpo
    from .ppo import PPOConfig, ppo
    from .reward import RewardConfig, train_reward_model
    from .sft import SFTConfig, sft

    return {"sft": (SFTConfig, sft), "rm": (RewardConfig, train_reward_model), "dpo": (DPOConfig, dpo),
            "ppo": (PPOConfig, ppo), "grpo": (GRPOConfig, grpo)}


def _coerce(key: str, text: str, typ):
    args = typing.get_args(typ)
    if args and type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return text.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"--{key}: {text!r} is not a boolean (use true/false)")
    if typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            raise ConfigError(f"--{key}: {text!r} is not a valid {typ.__name__}") from None
    return text


def parse(cls, argv: list[str]):
    """Split ``--key value`` / ``--key=value`` pairs into the stage's fields and TrainConfig overrides."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "train"}
    stage, rest, i = {}, [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key in fields:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key}: missing value")
                value, i = argv[i + 1], i + 1
            stage[key] = _coerce(key, value, hints[key])
        else:
            rest.append(arg)
        i += 1
    return cls(**stage, train=parse_overrides(rest))


def main(argv: list[str]) -> int:
    name, rest = argv[0], argv[1:]
    stages = _stages()
    if name not in stages:
        print(f"pyllm post: unknown stage {name!r}; use one of {', '.join(stages)}", file=sys.stderr)
        return 2
    cls, run = stages[name]
    if rest and rest[0] in ("-h", "--help"):
        print(f"usage: pyllm {name} [--field value ...]\n\n{cls.__doc__}\n\nfields:")
        for f in dataclasses.fields(cls):
            if f.init and f.name != "train":
                print(f"  --{f.name} (default {f.default})")
        print("and any `pyllm train` option (--lr, --max_steps, --batch_size, --model.n_layer ...); "
              f"this stage's training defaults: {cls().stage_defaults()}")
        return 0
    errors = (ConfigError, DataError, ValueError, FileNotFoundError)
    try:
        cfg = parse(cls, rest)
    except errors as e:  # found in the command line and the files it names: every process finds the same
        print_error(f"pyllm {name}", e, same_on_every_rank=True)
        return 2
    try:
        summary = run(cfg)
    except errors as e:  # may be one process's own (its share of the data, its node's files)
        print_error(f"pyllm {name}", e, same_on_every_rank=False)
        return 2
    from pyllm.data.jsonl import strict_json

    report = {k: summary[k] for k in ("stage", "before", "after", "model_dir") if k in summary}
    report["train_time_s"] = summary["train"].get("train_time_s")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(json.dumps(strict_json(report), indent=1))
    return 0
