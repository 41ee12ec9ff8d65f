"""``pyllm train``: pretrain a model on a text file/folder, the built-in text or token shards.

    pyllm train --preset shakespeare_char_cpu --data input.txt --max_steps 500 --model.n_layer 6
    torchrun --nproc_per_node 8 -m pyllm.cli train --preset gpt2_small_bf16 --data shards/ --distributed fsdp

Every TrainConfig field is an option (``--name value`` or ``--name=value``); model fields are
``--model.<field>``. ``--list`` shows the fields and presets.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .checkpoint import CheckpointError
from .config import PRESETS, ConfigError, TrainConfig, build_config, parse_overrides
from .data import DataError


def describe() -> str:
    lines = ["presets: " + ", ".join(PRESETS), "", "fields (defaults):"]
    lines += [f"  --{f.name} {f.default if f.default is not dataclasses.MISSING else '{}'}"
              for f in dataclasses.fields(TrainConfig)]
    lines.append("  --model.<field> VALUE  (any pyllm.model.ModelConfig field)")
    return "\n".join(lines)


def format_summary(summary: dict) -> str:
    keys = ("steps", "tokens", "train_time_s", "tokens_per_s", "final_loss", "eval", "best", "mfu",
            "peak_memory_gb", "energy_kwh", "co2_kg", "skipped_steps", "model_dir")
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(f"  {k:<15} {fmt(summary[k])}" for k in keys if summary.get(k) is not None)


def print_error(prog: str, error: Exception, same_on_every_rank: bool) -> None:
    """``<prog>: error: <error>`` on stderr. Under torchrun (env RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE) an
    error every process finds alike is printed once per node (by its local rank 0: another node may lack a file),
    any other by each process that meets it; with more than one process "rank N: " names the one that printed,
    except for the first kind on a single node."""
    env = lambda key, default: int(os.environ.get(key, default))  # noqa: E731
    rank, world_size = env("RANK", "0"), env("WORLD_SIZE", "1")
    if world_size > 1 and same_on_every_rank and env("LOCAL_RANK", "0") != 0:
        return
    single_node = env("LOCAL_WORLD_SIZE", str(world_size)) == world_size
    prefix = f"rank {rank}: " if world_size > 1 and not (same_on_every_rank and single_node) else ""
    sys.stderr.write(f"{prefix}{prog}: error: {error}\n")  # one write: the processes' lines do not interleave
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pyllm train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"start from a named config: {', '.join(PRESETS)}")
    parser.add_argument("--list", action="store_true", help="show the presets and every config field")
    args, rest = parser.parse_known_args(argv)
    if args.list:
        print(describe())
        return 0
    try:
        cfg = build_config(args.preset, parse_overrides(rest))
    except ConfigError as e:  # found in the command line alone: every process finds the same
        print_error("pyllm train", e, same_on_every_rank=True)
        return 2
    from .run import train

    try:
        summary = train(cfg)
    except (ConfigError, DataError, CheckpointError) as e:  # may be one process's own (its shards, its node's files)
        print_error("pyllm train", e, same_on_every_rank=False)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one report
        print(f"pyllm train: done\n{format_summary(summary)}")
    return 0
