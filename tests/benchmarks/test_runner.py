"""``python -m benchmarks``: runs, appends, resumes, renders; bad arguments are one-line errors."""

import subprocess
import sys
from pathlib import Path

from benchmarks import results
from benchmarks.__main__ import main
from pyllm.train import host_memory

ROOT = Path(__file__).resolve().parents[2]


def test_short_run_appends_resumes_and_renders(tmp_path, capsys):
    out = tmp_path / "cpu.jsonl"
    args = ["--suite", "short", "--ops", "softmax", "--modes", "fwd", "--providers", "torch eager,pyllm-cpu",
            "--out", str(out), "--threads", "1"]
    assert main(args) == 0
    recs = [r for r in results.read(out) if r["kind"] == "op"]
    assert {r["provider"] for r in recs} == {"torch eager", "pyllm-cpu"}
    eager = next(r for r in recs if r["provider"] == "torch eager")
    assert eager["status"] == "ok" and eager["machine"]["torch_threads"] == 1 and eager["shape"] == {"rows": 64, "cols": 512}
    # freed host memory kept for every provider (glibc), and said so in the record and the rendered header
    kept = "kept" if host_memory.glibc() else "allocator default"
    assert eager["machine"]["host_memory"] == kept and host_memory.in_effect() == (kept == "kept")
    assert (tmp_path / "cpu.md").exists() and f"host memory {kept}" in (tmp_path / "cpu.md").read_text()
    assert main(args + ["--resume"]) == 0  # everything measured already: nothing new but the calibration
    again = [r for r in results.read(out) if r["kind"] == "op"]
    assert len(again) == len(recs)
    assert "resume: 1 (op, case, dtype) already measured" in capsys.readouterr().out


def test_unknown_op_is_a_one_line_error(capsys):
    assert main(["--ops", "softmaxx"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark 'softmaxx'" in err and len(err.strip().splitlines()) == 1


def test_pytest_benchmark_form_collects_and_runs():
    """``pytest benchmarks/bench_<op>.py``: the check runs, then pytest-benchmark times the call."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "benchmarks/bench_softmax.py",
                           "-k", "torch and eager and fwd and not bwd", "--benchmark-disable"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_appended_results_do_not_mark_the_code_as_changed(tmp_path, monkeypatch):
    """A suite run in two parts (fp32, then bf16 with --resume) starts its second part with the results file
    already appended to: that is not a change to the code measured (it made every such session "with
    uncommitted changes"); a change to any other tracked file is."""
    from benchmarks import machine

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "cpu.jsonl").write_text("{}\n")
    (tmp_path / "kernel.cpp").write_text("int x;\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    monkeypatch.setattr(machine, "REPO", tmp_path)
    assert not machine.code_changed()
    (tmp_path / "benchmarks" / "results" / "cpu.jsonl").write_text("{}\n{}\n")
    assert not machine.code_changed()
    (tmp_path / "kernel.cpp").write_text("int y;\n")
    assert machine.code_changed()
