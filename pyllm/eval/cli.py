"""``pyllm eval``: evaluate a saved model on tasks and/or texts; write JSON results and a Markdown table.

    pyllm eval --model runs/x/final --tasks stdlib_name,arithmetic,my_task.yaml --text held_out.txt \\
        --out results.json --markdown results.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .builtin import BUILTIN_TASKS
from .perplexity import perplexity
from .report import markdown_table, write_report
from .runner import run_tasks
from .tasks import TaskError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pyllm eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory written by save_model (with tokenizer files)")
    p.add_argument("--tasks", default="", help=f"comma-separated built-in tasks ({', '.join(BUILTIN_TASKS)}) "
                                               "and/or task files (.yaml/.yml/.json)")
    p.add_argument("--text", action="append", default=[],
                   help="text file (or folder of them) to score (perplexity, bits-per-byte); repeatable; one "
                        "document per file")
    p.add_argument("--limit", type=int, help="evaluate only the first N items of each task")
    p.add_argument("--num-fewshot", type=int, help="override each task's number of few-shot examples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=list(_DTYPES))
    p.add_argument("--out", default="eval_results.json", help="JSON results path")
    p.add_argument("--markdown", help="Markdown table path (default: --out with .md)")
    args = p.parse_args(argv)
    if not args.tasks and not args.text:
        p.error("nothing to evaluate: give --tasks and/or --text")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from pyllm.model import load_model
    from pyllm.tokenizer import load_tokenizer
    from pyllm.train.config import device_problem
    from pyllm.train.data import read_documents

    if (problem := device_problem(args.device)) is not None:
        print(f"pyllm eval: {problem.replace('device=', '--device ')}", file=sys.stderr)
        return 2
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = load_model(args.model, device=args.device, dtype=_DTYPES[args.dtype])
        tokenizer = load_tokenizer(args.model)
        tasks = [t for t in args.tasks.split(",") if t]
        results = run_tasks(model, tokenizer, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                            batch_size=args.batch_size, progress=True)
        for path in args.text:
            docs = read_documents(path)  # a file, or a folder's text files; errors name the file
            results[f"text:{Path(path).name}"] = perplexity(model, tokenizer, docs, batch_size=args.batch_size)
    except (TaskError, FileNotFoundError, ValueError) as e:
        print(f"pyllm eval: {e}", file=sys.stderr)
        return 2
    meta = {"model": args.model, "device": args.device, "dtype": args.dtype, "limit": args.limit,
            "num_fewshot": args.num_fewshot, "tasks": tasks, "texts": args.text}
    md = args.markdown or str(Path(args.out).with_suffix(".md"))
    print(markdown_table(results), end="")  # first: a report path that cannot be written loses nothing
    try:
        write_report(results, meta, args.out, md)
    except OSError as e:
        print(f"pyllm eval: cannot write the report: {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    return 0
