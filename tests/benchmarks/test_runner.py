"""``python -m benchmarks``: runs, appends, resumes, renders; bad arguments are one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("op", ["softmax", "train_step"])
def test_unknown_provider_is_a_one_line_error_listing_the_valid_ones(tmp_path, capsys, op):
    out = tmp_path / "cpu.jsonl"
    assert main(["--ops", op, "--providers", "pyllm-cpuu", "--out", str(out), "--no-render"]) == 2
    err = capsys.readouterr().err
    assert "unknown provider 'pyllm-cpuu'" in err and "pyllm-cpu" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # nothing measured, nothing marked done


def test_resume_skips_only_cases_an_earlier_run_covered(tmp_path, capsys):
    """A --providers/--modes subset marks its cases done for that subset only: a full --resume measures the rest."""
    out = tmp_path / "cpu.jsonl"
    base = ["--suite", "short", "--ops", "softmax", "--out", str(out), "--threads", "1", "--no-render"]
    assert main(base + ["--modes", "fwd", "--providers", "torch eager"]) == 0
    done = [r for r in results.read(out) if r["kind"] == "case_done"]
    assert done and done[0]["selection"] == {"providers": ["torch eager"], "modes": ["fwd"]}
    assert main(base + ["--modes", "fwd", "--providers", "torch eager,pyllm-cpu", "--resume"]) == 0
    assert "resume: 0 (op, case, dtype)" in capsys.readouterr().out
    assert {r["provider"] for r in results.read(out) if r["kind"] == "op"} == {"torch eager", "pyllm-cpu"}
    assert main(base + ["--modes", "fwd", "--providers", "pyllm-cpu", "--resume"]) == 0  # a subset: covered
    assert "resume: 1 (op, case, dtype)" in capsys.readouterr().out


def test_train_step_measures_only_the_providers_named(tmp_path, capsys):
    """--providers picks training backends by the op benchmarks' names ("pyllm-cpu" trains backend "cpu"); one
    with no training step here, and a dtype the device lacks, are said; a --resume with more providers measures
    the rest."""
    out = tmp_path / "cpu.jsonl"
    base = ["--device", "cpu", "--suite", "short", "--ops", "train_step", "--dtypes", "fp32,tf32", "--out", str(out),
            "--threads", "1", "--no-render"]
    assert main(base + ["--providers", "pyllm-cpu,pyllm-triton"]) == 0
    assert [r["backend"] for r in results.read(out) if r["kind"] == "train_step"] == ["cpu"]
    printed = capsys.readouterr().out
    assert "train_step           pyllm-triton skipped: backend 'triton' has no training step on cpu" in printed
    assert "train_step           tf32 skipped: tf32 is a CUDA-only dtype" in printed
    assert main(base + ["--providers", "torch eager,pyllm-cpu", "--resume"]) == 0
    assert "resume: 1 (op, case, dtype)" in capsys.readouterr().out
    assert sorted(r["backend"] for r in results.read(out) if r["kind"] == "train_step") == ["cpu", "torch"]


def test_a_dtype_the_device_lacks_is_said_and_the_rest_measured(tmp_path, capsys):
    out = tmp_path / "cpu.jsonl"
    assert main(["--device", "cpu", "--suite", "short", "--ops", "softmax", "--modes", "fwd", "--providers",
                 "torch eager", "--dtypes", "fp32,tf32", "--out", str(out), "--threads", "1", "--no-render"]) == 0
    assert "softmax              tf32 skipped: tf32 is a CUDA-only dtype" in capsys.readouterr().out
    assert {r["dtype"] for r in results.read(out) if r["kind"] == "op"} == {"fp32"}
    # a name given twice is measured once
    out.unlink()
    assert main(["--device", "cpu", "--suite", "short", "--ops", "softmax", "--modes", "fwd", "--providers",
                 "torch eager", "--dtypes", "fp32,fp32", "--out", str(out), "--threads", "1", "--no-render"]) == 0
    records = [r for r in results.read(out) if r["kind"] == "op"]
    assert len(records) == len({(r["case"], r["dtype"], r["provider"], r["mode"]) for r in records})


@pytest.mark.parametrize("ops, option, reason", [
    ("softmax,train_step", ["--dtypes", "tf32"], "tf32 is a CUDA-only dtype"),
    ("train_step", ["--dtypes", "fp16"], "fp16 training (autocast with the loss scaler) is measured on CUDA only"),
    ("train_step", ["--providers", "pyllm-triton"], "backend 'triton' has no training step on cpu"),
    ("softmax", ["--cases", "typo"], "no case label of suite short contains 'typo'"),
])
def test_nothing_to_measure_is_a_one_line_error(tmp_path, capsys, ops, option, reason):
    """Not "complete" after measuring nothing: the run stops before it calibrates or writes anything."""
    out = tmp_path / "cpu.jsonl"
    assert main(["--device", "cpu", "--suite", "short", "--ops", ops, *option, "--out", str(out), "--no-render"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyllm bench: nothing to measure on cpu: ") and reason in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_resume_does_not_trust_a_case_done_without_its_selection():
    """Records written before the selection was recorded cover nothing: a re-measure beats a silent gap."""
    machine = {"commit": "abc", "device_name": "cpu"}
    old = {"kind": "case_done", "op": "softmax", "case": "c", "dtype": "fp32", "suite": "short", "machine": machine}
    key = results.session_key(old)
    want = {"softmax": {"providers": ["torch eager"], "modes": ["fwd"]}}
    assert results.done_cases([old], key, want) == set()
    new = {**old, "selection": {"providers": ["pyllm-cpu", "torch eager"], "modes": ["fwd", "bwd"]}}
    assert results.done_cases([new], key, want) == {("softmax", "c", "fp32")}


def _truncated_results(tmp_path) -> Path:
    path = tmp_path / "cpu.jsonl"
    log = results.ResultLog(path, {"commit": "abc", "device_name": "cpu"})
    log.append({"kind": "calibration", "suite": "short"})
    log.append({"kind": "calibration", "suite": "short"})
    path.write_bytes(path.read_bytes()[:-40])  # a run killed mid-write
    return path


def test_a_truncated_last_line_stays_one_bad_line_and_is_skipped_on_reading(tmp_path):
    path = _truncated_results(tmp_path)
    with pytest.warns(RuntimeWarning, match=f"{path}:2: "):
        assert len(results.read(path)) == 1
    results.ResultLog(path, {"commit": "abc"}).append({"kind": "calibration", "suite": "short"})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[2])["kind"] == "calibration"  # not glued onto line 2
    with pytest.warns(RuntimeWarning, match=f"{path}:2: "):  # now in the middle: still one skipped line
        assert [r["kind"] for r in results.read(path)][-1] == "calibration"


def test_unreadable_results_are_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"schema": "pyllm-bench-v0"}) + "\n")  # another schema
    assert main(["render", "--results", str(path)]) == 2
    assert main(["--ops", "softmax", "--resume", "--out", str(path), "--no-render"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith(f"pyllm bench: {path}:1: field 'schema'") for e in err)


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_unwritable_out_is_a_one_line_error(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = tmp_path if where == "directory" else tmp_path / "file" / "cpu.jsonl"
    assert main(["--ops", "softmax", "--out", str(out), "--no-render"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pyllm bench: {out}") and len(err.strip().splitlines()) == 1


def test_render_of_a_missing_file_is_a_one_line_error(tmp_path, capsys):
    assert main(["render", "--results", str(tmp_path / "typo.jsonl")]) == 2
    assert "typo.jsonl: no such results file" in capsys.readouterr().err
    assert not (tmp_path / "typo.md").exists()
