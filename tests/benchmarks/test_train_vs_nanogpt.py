"""benchmarks/train_vs_nanogpt.py: bad input is a one-line error, and a program that fails stops the run."""

import os
import sys

import pytest

from benchmarks import train_vs_nanogpt as tvn


def fake_checkout(tmp_path, train_py="raise SystemExit(0)\n"):
    checkout = tmp_path / "nanoGPT"
    (checkout / "config").mkdir(parents=True)
    for name in ("model.py", "configurator.py"):
        (checkout / name).write_text("")
    (checkout / "train.py").write_text(train_py)
    text = tmp_path / "input.txt"
    text.write_text("hello world\n" * 100)
    return checkout, text


def test_missing_checkout_and_bad_arguments_are_one_line_errors(tmp_path, capsys):
    checkout, text = fake_checkout(tmp_path)
    assert tvn.main(["--nanogpt", str(tmp_path / "nowhere"), "--text", str(text)]) == 2
    assert "nanoGPT checkout not found" in capsys.readouterr().err
    assert tvn.main(["--nanogpt", str(checkout), "--text", str(text), "--repeats", "0"]) == 2
    assert "--repeats 0: expected at least 1" in capsys.readouterr().err
    assert tvn.main(["--nanogpt", str(checkout), "--text", str(text), "--pyllm-arg=--nope 3"]) == 2
    err = capsys.readouterr().err
    assert "train_vs_nanogpt: --pyllm-arg --nope 3: unknown config key 'nope'" in err and "Traceback" not in err


def test_a_failing_program_is_named_with_its_stderr_and_the_other_is_stopped(tmp_path, capsys, monkeypatch):
    checkout, text = fake_checkout(tmp_path, "import sys, time\ntime.sleep(1)\nsys.stderr.write('boom from nanoGPT')\n"
                                             "sys.exit(3)\n")
    pid_file = tmp_path / "pyllm.pid"
    sleeper = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    monkeypatch.setattr(tvn, "pyllm_command", lambda *a, **k: [sys.executable, "-c", sleeper])
    assert tvn.main(["--nanogpt", str(checkout), "--text", str(text), "--steps", "2"]) == 1  # both at once
    err = capsys.readouterr().err
    assert "nanoGPT failed (exit 3)" in err and "boom from nanoGPT" in err
    with pytest.raises(ProcessLookupError):  # pyllm's process was killed (and reaped), not left running
        os.kill(int(pid_file.read_text()), 0)


def test_both_at_once_split_the_cores_unless_told(tmp_path, monkeypatch):
    checkout, text = fake_checkout(tmp_path)
    seen = []

    def run_once(a, text, extra, env, order):
        seen.append((a.sequential, env.get("OMP_NUM_THREADS")))
        raise tvn.RunFailed("stop here")

    monkeypatch.setattr(tvn, "run_once", run_once)
    monkeypatch.setattr(tvn.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    base = ["--nanogpt", str(checkout), "--text", str(text)]
    for extra in ([], ["--sequential"], ["--threads", "3"]):
        assert tvn.main(base + extra) == 1
    assert seen == [(False, "4"), (True, None), (False, "3")]
