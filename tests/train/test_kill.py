"""A real SIGKILL: `pyllm train` killed mid-run, restarted with the same command, reproduces the
losses of an uninterrupted run bit for bit (CPU, one thread on both sides)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from pyllm.train.cli import main


def _losses(out_dir) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a resumed run appends; the last record of a step wins)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    args = ["--preset", "smoke", "--max_steps", "100", "--ckpt_every", "3", "--keep_last", "2", "--log_every", "1",
            "--eval_every", "0", "--threads", "1", "--progress", "false"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pyllm.cli", "train", *args, "--out_dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").exists() and len(_losses(killed)) >= 5:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished (or failed) before it could be killed"
    steps_before_kill = max(_losses(killed))
    assert steps_before_kill < 100

    assert main([*args, "--out_dir", str(killed)]) == 0  # same command: resumes from the last checkpoint
    resumed_from = json.loads((killed / "summary.json").read_text())["resumed_from"]
    assert 3 <= resumed_from <= steps_before_kill and resumed_from % 3 == 0
    assert main([*args, "--out_dir", str(tmp_path / "whole")]) == 0
    resumed, whole = _losses(killed), _losses(tmp_path / "whole")
    assert sorted(resumed) == list(range(1, 101))
    assert resumed == whole
