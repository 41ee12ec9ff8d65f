"""pyllm's trainer vs nanoGPT's train.py, side by side on the same machine, text and configuration.

The configuration is nanoGPT's published CPU run (README, "I only have a macbook"): character-level,
block 64, batch 12, 4 layers x 4 heads x width 128, no dropout, no biases, lr 1e-3 with 100 warmup
steps and cosine decay to 1e-4 at max_iters, AdamW beta2 0.99, weight decay 0.1, grad clip 1.0.
pyllm runs the same architecture (exact GELU, tied embeddings, pre-LayerNorm) with its
``shakespeare_char_cpu`` preset's defaults: bf16 autocast (fp32 weights and optimiser) on a CPU with
native bf16 dot products, else fp32. nanoGPT's train.py runs fp32 on a CPU whatever its ``--dtype``
(its autocast context is disabled for device "cpu"); the record names both precisions.

    python benchmarks/train_vs_nanogpt.py --nanogpt /path/to/nanoGPT --text input.txt [--steps 2000]

nanoGPT's own files (train.py, model.py, configurator.py, config/) are copied into a temporary work
directory beside its data (train.bin/val.bin/meta.pkl, its char-level format and 90/10 split), so the
checkout is not modified; both programs run as subprocesses with the same thread count, by default at
the same time with half the cores each (on a shared machine, sequential runs see different loads;
concurrent ones share it; ``--sequential`` gives each every core, as the README's figures do). Reported:
tokens/s (median over per-step times, excluding the first ``--warmup`` steps and steps that include an
evaluation), total wall time, and the validation loss at the last step (nanoGPT: ``--eval-iters``
random batches; pyllm: the same number of fixed batches), plus the ratios. ``--repeats N`` runs both N
times (sequential runs in alternating order) and reports the median speedup with its range: on a shared
VM either program's rate can drop by a quarter for a minute or more, so one sequential pair can mislead.
``--out`` appends one JSON line with the machine (CPU family and vector extensions), versions, commit,
settings and every run.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pyllm.data.jsonl import read_json_lines
from pyllm.info import cpu_identity, cpu_label
from pyllm.train.config import ConfigError, build_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


class RunFailed(RuntimeError):
    """nanoGPT or pyllm exited with an error."""


def nanogpt_data(text: str, data_dir: Path) -> None:
    """nanoGPT's shakespeare_char/prepare.py format: sorted characters, uint16 ids, 90/10 split."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(0.9 * len(ids))
    data_dir.mkdir(parents=True)
    ids[:n].tofile(data_dir / "train.bin")
    ids[n:].tofile(data_dir / "val.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)


def nanogpt_command(checkout: Path, text: str, work: Path, steps: int, eval_interval: int,
                    eval_iters: int) -> list[str]:
    """Prepare a work directory with nanoGPT's files and data; return its command line (run in ``work``)."""
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(checkout / name, work / name)
    shutil.copytree(checkout / "config", work / "config")
    nanogpt_data(text, work / "data" / "bench")
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
           f"--eval_iters={eval_iters}", "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4",
           "--n_head=4", "--n_embd=128", f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--dropout=0.0",
           "--dataset=bench", "--dtype=float32", f"--eval_interval={eval_interval}", "--out_dir=out"]


# Variables that narrow PyTorch's, MKL's, oneDNN's and pyllm's CPU kernels to an instruction set.
ISA_ENV = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "PYLLM_CPU_ISA")


def nanogpt_result(stdout: str, eval_interval: int, wall: float) -> dict:
    step_ms = {int(m[1]): float(m[2]) for m in re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", stdout)}
    val = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", stdout)}
    # an iteration's time includes the evaluation run at its start (iter % eval_interval == 0)
    times = [ms / 1e3 for it, ms in step_ms.items() if it % eval_interval]
    return {"step_times": times, "val_loss": val[max(val)], "val_step": max(val), "wall_s": wall}


def pyllm_command(text_file: Path, out: Path, steps: int, eval_interval: int, eval_iters: int, compile_: bool,
                  extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pyllm.cli", "train", "--preset", "shakespeare_char_cpu", "--data", str(text_file),
           "--max_steps", str(steps), "--eval_every", str(eval_interval), "--eval_batches", str(eval_iters),
           "--log_every", "1", "--out_dir", str(out), "--resume", "false", "--progress", "false",
           "--compile", str(compile_), "--model.gelu_approximate", "none", *extra]


def pyllm_result(out: Path, wall: float) -> dict:
    records = [record for _, record in read_json_lines(out / "metrics.jsonl")]
    tokens_per_step = 12 * 64
    # the per-step records carry tokens/s of that step alone (log_every 1); evaluations are timed apart
    times = [tokens_per_step / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    return {"step_times": times, "val_loss": val[-1][1], "val_step": val[-1][0], "wall_s": wall}


def summarise(name: str, r: dict, warmup: int) -> dict:
    times = r["step_times"][warmup:]
    med = statistics.median(times)
    q = statistics.quantiles(times, n=4)
    return {"name": name, "tokens_per_s": 768 / med, "tokens_per_s_p25_p75": [768 / q[2], 768 / q[0]],
            "median_step_ms": med * 1e3, "val_loss": r["val_loss"], "val_step": r["val_step"], "wall_s": r["wall_s"],
            "steps_timed": len(times)}


def run_once(a, text: str, extra: list[str], env: dict, order: tuple[str, str]) -> list[dict]:
    """One run of both programs (in ``order`` when sequential, else at the same time): [nanoGPT row, pyllm row]."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        jobs = {"nanoGPT": (nanogpt_command(a.nanogpt, text, work, a.steps, a.eval_interval, a.eval_iters), work),
                "pyllm": (pyllm_command(a.text, work / "pyllm", a.steps, a.eval_interval, a.eval_iters,
                                        a.pyllm_compile, extra), ROOT)}
        groups = [[n] for n in order] if a.sequential else [list(order)]
        walls, outputs = {}, {}
        for names in groups:  # concurrently by default: both see the same machine load at the same time
            t0 = time.perf_counter()
            procs = {n: subprocess.Popen(jobs[n][0], cwd=jobs[n][1], env=env, stdout=open(work / f"{n}.out", "w"),
                                         stderr=open(work / f"{n}.err", "w")) for n in names}
            try:
                while procs:
                    for n, proc in list(procs.items()):
                        if proc.poll() is not None:
                            walls[n] = time.perf_counter() - t0
                            del procs[n]
                            if proc.returncode:
                                err = (work / f"{n}.err").read_text()
                                raise RunFailed(f"{n} failed (exit {proc.returncode}); the end of its stderr:\n"
                                                f"{err[-2000:]}")
                    time.sleep(0.2)
            finally:  # after a failure or an interrupt, the other program does not run on alone
                for proc in procs.values():
                    proc.kill()
                    proc.wait()
            outputs.update({n: (work / f"{n}.out").read_text() for n in names})
        nano = nanogpt_result(outputs["nanoGPT"], a.eval_interval, walls["nanoGPT"])
        ours = pyllm_result(work / "pyllm", walls["pyllm"])
    return [summarise("nanoGPT", nano, a.warmup), summarise("pyllm", ours, a.warmup)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nanogpt", required=True, type=Path, help="a nanoGPT checkout (with train.py, model.py)")
    ap.add_argument("--text", required=True, type=Path, help="the training text (UTF-8)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-interval", type=int, default=250)
    ap.add_argument("--eval-iters", type=int, default=20, help="validation batches per evaluation (both sides)")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: unset with "
                                                               "--sequential, else half the cores each)")
    ap.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    ap.add_argument("--pyllm-compile", action="store_true", help="torch.compile pyllm's loss (nanoGPT stays at "
                                                                "its CPU setting, --compile=False)")
    ap.add_argument("--pyllm-arg", action="append", default=[], help="extra `pyllm train` argument (repeatable)")
    ap.add_argument("--sequential", action="store_true", help="run one after the other (default: both at once, "
                                                              "so that both see the same load on a shared machine)")
    ap.add_argument("--repeats", type=int, default=1, help="run both programs this many times (sequential: in "
                                                             "alternating order) and report the median speedup")
    ap.add_argument("--out", type=Path, help="append the result as one JSON line to this file")
    a = ap.parse_args(argv)
    for path, what in ((a.nanogpt / "train.py", "nanoGPT checkout"), (a.text, "text file")):
        if not path.is_file():
            print(f"train_vs_nanogpt: {what} not found: {path}", file=sys.stderr)
            return 2
    if a.repeats < 1:
        print(f"train_vs_nanogpt: --repeats {a.repeats}: expected at least 1", file=sys.stderr)
        return 2
    text = a.text.read_text(encoding="utf-8")
    extra = [s for arg in a.pyllm_arg for s in arg.split()]
    try:
        pyllm_precision = build_config("shakespeare_char_cpu", parse_overrides(extra)).precision
    except ConfigError as e:
        print(f"train_vs_nanogpt: --pyllm-arg {' '.join(extra)}: {e}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if a.threads is None and not a.sequential:
        # both at once with every core each oversubscribes the machine (2 cores, 2 threads each: both fell
        # to ~5.5k tok/s, a measurement of neither): at the same time, each gets half the cores
        a.threads = max(1, (os.cpu_count() or 2) // 2)
        print(f"train_vs_nanogpt: running both at once, {a.threads} thread(s) each (--threads to choose, "
              "--sequential to give each every core)", file=sys.stderr)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    load_before = os.getloadavg()
    runs = []
    for rep in range(a.repeats):
        # sequential repeats alternate the order (nanoGPT first, then pyllm first, ...), so a slow spell of a
        # shared machine does not always fall on the same program
        order = ("nanoGPT", "pyllm") if rep % 2 == 0 else ("pyllm", "nanoGPT")
        try:
            rows = run_once(a, text, extra, env, order)
        except RunFailed as e:
            print(f"train_vs_nanogpt: {e}", file=sys.stderr)
            return 1
        runs.append({"order": list(order) if a.sequential else "concurrent", "results": rows,
                     "speedup_tokens_per_s": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]})
        if a.repeats > 1:
            print(f"run {rep + 1}/{a.repeats}: nanoGPT {rows[0]['tokens_per_s']:.0f}, "
                  f"pyllm {rows[1]['tokens_per_s']:.0f} tok/s, {runs[-1]['speedup_tokens_per_s']:.2f}x", flush=True)
    speedups = sorted(r["speedup_tokens_per_s"] for r in runs)
    median_run = min(runs, key=lambda r: abs(r["speedup_tokens_per_s"] - statistics.median(speedups)))
    rows = median_run["results"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import torch

    ident = cpu_identity()
    machine = f"{platform.machine()} {os.cpu_count()} cpus, {cpu_label(ident)}, {' '.join(ident['isa'])}"
    result = {"benchmark": "train_vs_nanogpt", "machine": machine,
              "load_avg_1m_before_after": [load_before[0], os.getloadavg()[0]],
              "torch": torch.__version__, "commit": commit or "unknown (not a git checkout)", "threads": a.threads,
              "steps": a.steps, "text_chars": len(text), "dtype": {"nanoGPT": "fp32", "pyllm": pyllm_precision},
              "shape": "B12 T64 L4 H4 d128", "pyllm_compile": a.pyllm_compile, "concurrent": not a.sequential,
              "pyllm_args": a.pyllm_arg, "results": rows,
              # the median over the repeats (the run whose speedup is nearest it gives "results"), their range, and
              # every run: on a shared VM one program's rate can drop ~25% for a minute or more
              "speedup_tokens_per_s": statistics.median(speedups), "speedup_range": [speedups[0], speedups[-1]],
              "runs": runs,
              "val_loss_delta": rows[1]["val_loss"] - rows[0]["val_loss"],
              # how an AVX2-only machine is reproduced on a larger one (csrc/README.md); both runs inherit these
              "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    for r in rows:
        print(f"{r['name']:<8} {r['tokens_per_s']:9.0f} tok/s (p25-p75 {r['tokens_per_s_p25_p75'][0]:.0f}-"
              f"{r['tokens_per_s_p25_p75'][1]:.0f})  val loss {r['val_loss']:.4f} @ step {r['val_step']}  "
              f"wall {r['wall_s']:.0f}s")
    print(f"precision nanoGPT fp32, pyllm {pyllm_precision}")
    spread = f" (median of {a.repeats} runs: {speedups[0]:.2f}-{speedups[-1]:.2f}x)" if a.repeats > 1 else ""
    print(f"speedup {result['speedup_tokens_per_s']:.2f}x{spread}, "
          f"val loss pyllm - nanoGPT = {result['val_loss_delta']:+.4f}")
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
