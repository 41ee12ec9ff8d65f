"""``python -m benchmarks`` (or ``pyllm bench``): run the suite, append results, render the tables.

    python -m benchmarks --suite short                    # CI: a few small CPU shapes, checks on
    python -m benchmarks --suite cpu                      # the fuller CPU sweep
    python -m benchmarks --suite gpu --ops attention --time-limit 9 --resume   # one GPU piece
    python -m benchmarks render                           # re-render results/*.md and plots
    python -m benchmarks list --suite gpu                 # what a suite covers
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from pyllm.train import host_memory

from . import harness, machine, render, results

OPS = ("attention", "layer_norm", "rms_norm", "bias_gelu", "swiglu", "rope", "softmax", "matmul", "linear",
       "cross_entropy", "linear_cross_entropy", "adamw", "loss_scale", "train_step")


def load(name: str):
    """The BENCH object of ``bench_<name>.py``."""
    if name not in OPS:
        raise ValueError(f"unknown benchmark {name!r}; valid: {', '.join(OPS)}")
    return importlib.import_module(f"{__package__}.bench_{name}").BENCH


def _csv(value: str | None) -> tuple[str, ...] | None:
    """"a, b,,a" -> ("a", "b"): each name once (a repeated dtype was measured twice)."""
    return tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip())) if value else None


def _format(rec: dict) -> str:
    head = f"{rec['op']:<20} {rec['case'][:44]:<44} {rec['dtype']:<4} {rec['mode']:<7} {rec['provider']:<22}"
    if rec["status"] != "ok":
        return f"{head} {rec['status']}: {rec['reason']}"
    rate = (f"{rec['tflops']:8.3f} TFLOP/s" if rec.get("tflops") else
            f"{rec['gbps']:8.2f} GB/s" if rec.get("gbps") else
            f"{rec['tokens_per_s']:8.0f} tok/s" if rec.get("tokens_per_s") else "")
    roof = f" ({rec['roofline_pct']:.0f}% of measured peak)" if rec.get("roofline_pct") else ""
    return (f"{head} {rec['median_ms']:9.3f} ms [{rec['q25_ms']:.3f}, {rec['q75_ms']:.3f}] {rate}{roof}")


def _not_run(bench, opts: harness.RunOptions) -> dict[str, str]:
    """The selected dtypes (and, for train_step, providers) ``bench`` cannot measure here, with the reasons;
    an op benchmark records its absent providers itself, per case."""
    return opts.dtypes_not_run(bench) if isinstance(bench, harness.OpBench) else bench.not_run(opts)


def _has_work(bench, opts: harness.RunOptions) -> bool:
    runs = opts.dtypes_for(bench) if isinstance(bench, harness.OpBench) else bench.variants(opts)
    return bool(runs) and any(opts.selects_case(c.label) for c in bench.cases(opts.suite))


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suite = args.suite or ("gpu" if device == "cuda" else "short")
    try:
        opts = harness.RunOptions(suite=suite, device=device, modes=_csv(args.modes) or harness.MODES,
                                  dtypes=_csv(args.dtypes), providers=_csv(args.providers), cases=_csv(args.cases))
        names = _csv(args.ops) or OPS
        benches = [load(n) for n in names]
        opts.check_providers(benches)
        not_run = {b.op: _not_run(b, opts) for b in benches}
        if not any(_has_work(b, opts) for b in benches):  # not "complete" after measuring nothing
            why = list(dict.fromkeys(r for reasons in not_run.values() for r in reasons.values()))
            if not any(opts.selects_case(c.label) for b in benches for c in b.cases(suite)):
                why.append(f"no case label of suite {suite} contains {' or '.join(map(repr, opts.cases))}")
            raise ValueError(f"nothing to measure on {device}: {'; '.join(why)}")
    except ValueError as e:
        print(f"pyllm bench: {e}", file=sys.stderr)
        return 2
    if args.threads:
        # on a shared machine, OpenMP threads waiting on each other at barriers turn every preemption
        # into a stall: one thread per process gives repeatable CPU numbers there
        torch.set_num_threads(args.threads)
    # The trainer's allocator setting (pyllm/train/host_memory.py) for every provider alike: with glibc's
    # defaults a CPU fwd+bwd of MB-sized tensors mostly times pages being unmapped and faulted back in
    # (layer_norm 1024 x 768 fp32 fwd+bwd, one thread: eager 1.50 ms, pyllm-cpu 0.35-2.30 ms; kept: 0.50 and
    # 0.33-0.35 ms). Recorded with the results; --default-malloc measures without it.
    # (what is recorded is the process's state: an earlier caller in the same process may have set it)
    kept = device == "cpu" and ((not args.default_malloc and host_memory.keep_freed_memory())
                                or host_memory.in_effect())
    out = Path(args.out) if args.out else results.default_path(device)
    info = machine.describe(device)
    if device == "cpu":
        info["host_memory"] = "kept" if kept else "allocator default"
    log = results.ResultLog(out, info)
    try:
        log.check()
        done = set()
        if args.resume:
            selections = {b.op: opts.selection(b) for b in benches if isinstance(b, harness.OpBench)}
            done = results.done_cases(results.read(out), results.session_key({"machine": info, "suite": suite}),
                                      selections)
    except (ValueError, OSError) as e:  # JsonLinesError is a ValueError
        print(f"pyllm bench: {e}", file=sys.stderr)
        return 2
    print(f"device: {info['device_name']}; torch {info['torch']}, triton {info['triton']}; commit "
          f"{(info['commit'] or '?')[:12]}{' (dirty)' if info['dirty'] else ''}; suite {suite}; results -> {out}")
    if args.resume:
        print(f"resume: {len(done)} (op, case, dtype) already measured in this session are skipped")
    for op, reasons in not_run.items():
        for name, reason in reasons.items():
            print(f"{op:<20} {name} skipped: {reason}")
    all_dtypes = {d for b in benches if isinstance(b, harness.OpBench) for d in opts.dtypes_for(b)}
    all_dtypes |= {p for b in benches if hasattr(b, "variants") for _, p, _ in b.variants(opts)}  # train_step
    all_dtypes = sorted(all_dtypes | {"fp32"})  # the matmul peak of each precision measured (MFU, roofline)
    calib = machine.calibrate(device, all_dtypes, budget_s=1.0)
    log.append({"kind": "calibration", "suite": suite, **calib})
    print(f"calibration: copy {calib['copy_gbps']:.1f} GB/s; matmul peak "
          + ", ".join(f"{d} {t:.3f} TFLOP/s" for d, t in calib["matmul_tflops"].items()))
    deadline = time.monotonic() + args.time_limit * 60 if args.time_limit else None
    cut = []
    printed_skips: set[tuple] = set()

    def emit(rec: dict) -> None:
        log.append({"kind": "op", **rec})
        if rec.get("kind") == "case_done":
            return
        key = (rec["op"], rec["provider"], rec["reason"])
        if rec["status"] == "ok" or key not in printed_skips:
            printed_skips.add(key)
            print(_format(rec), flush=True)

    def skip(op: str):
        def fn(label: str, dtype: str) -> bool:
            if (op, label, dtype) in done:
                return True
            if deadline is not None and time.monotonic() > deadline:
                cut.append((op, label, dtype))
                return True
            return False
        return fn

    for name, bench in zip(names, benches):
        if isinstance(bench, harness.OpBench):
            harness.run_op(bench, opts, calib, emit, skip(bench.op))
        else:
            bench.run(opts, calib, emit, skip(bench.op))
    if cut:
        print(f"time limit reached: {len(cut)} (op, case, dtype) not run; re-run the same command with "
              f"--resume to continue")
    else:
        print("complete: every selected case of this suite is measured")
    if not args.no_render:
        return _render([out])
    return 0


def _render(paths: list[Path]) -> int:
    for p in paths:
        if not p.is_file():  # rendering nothing would write an empty <stem>.md next to the typo
            print(f"pyllm bench: {p}: no such results file", file=sys.stderr)
            return 2
    try:
        for p in paths:
            print("rendered: " + ", ".join(str(w) for w in render.render_file(p)))
    except (ValueError, OSError) as e:  # a malformed record (JsonLinesError is a ValueError), an unwritable .md
        print(f"pyllm bench: {e}", file=sys.stderr)
        return 2
    return 0


def list_cases(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    suite = args.suite or ("gpu" if device == "cuda" else "short")
    opts = harness.RunOptions(suite=suite, device=device if device == "cpu" or torch.cuda.is_available() else "cpu")
    for name in _csv(args.ops) or OPS:
        bench = load(name)
        dtypes = ", ".join(opts.dtypes_for(bench)) if isinstance(bench, harness.OpBench) else "see bench_train_step.py"
        print(f"{name}  [{dtypes}]")
        for case in bench.cases(suite):
            print(f"    {case.label}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="pyllm bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", nargs="?", default="run", choices=("run", "render", "list"))
    parser.add_argument("--suite", choices=harness.SUITES, help="default: gpu with a CUDA device, else short")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available")
    parser.add_argument("--ops", help=f"comma-separated subset of: {', '.join(OPS)}")
    parser.add_argument("--modes", help="comma-separated subset of fwd,bwd,fwd+bwd")
    parser.add_argument("--dtypes", help="comma-separated subset of fp32,tf32,fp16,bf16")
    parser.add_argument("--providers", help="comma-separated provider names (default: all)")
    parser.add_argument("--cases", help="comma-separated substrings of case labels to keep")
    parser.add_argument("--out", help="results file (default: benchmarks/results/{cpu,gpu}.jsonl)")
    parser.add_argument("--resume", action="store_true",
                        help="skip (op, case, dtype) already in the results file for this configuration "
                             "(commit, device, suite, threads, ...)")
    parser.add_argument("--time-limit", type=float, help="minutes; no new case starts after this")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); recorded")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: leave glibc's malloc settings as they are (default: keep freed memory, as the "
                             "trainer does); recorded")
    parser.add_argument("--no-render", action="store_true", help="do not re-render the Markdown and plots")
    parser.add_argument("--results", nargs="*", help="render: results files (default: results/*.jsonl)")
    args = parser.parse_args(argv)
    if args.action == "render":
        return _render([Path(p) for p in args.results] if args.results else sorted(results.RESULTS_DIR.glob("*.jsonl")))
    if args.action == "list":
        return list_cases(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
