"""The pyllm command: help, unknown commands, and `pyllm info`."""

from pyllm import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyllm <command>")
    assert all(name in out for name in cli.COMMANDS)
    assert cli.main([]) == 0


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "usage:" in err


def test_info_reports_backends_and_ops(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pyllm ")
    assert "torch   available" in out
    assert "device: " in out and (" cores" in out or "CUDA" in out)  # the CPU with its core count, or the GPU
    for op in ("attention", "cross_entropy", "adamw_step"):
        assert op in out


def test_subcommand_gets_its_arguments_and_none_means_success(monkeypatch):
    import sys
    import types

    calls = []
    fake = types.ModuleType("pyllm.post.cli")
    fake.main = lambda argv: calls.append(argv)  # returns None
    monkeypatch.setitem(sys.modules, "pyllm.post.cli", fake)
    assert cli.main(["dpo", "--beta", "0.1"]) == 0
    assert calls == [["dpo", "--beta", "0.1"]]  # post-training stages learn their name from argv[0]


def test_pyllm_warnings_are_one_line_naming_the_command(tmp_path):
    """A warning raised by pyllm reaches a command-line user as "pyllm <command>: warning: <message>", not
    as a file path, line number, category and source line (here: fp16 training on a CPU without fp16
    matrix units, which is emulated); other packages' warnings keep Python's format."""
    import subprocess
    import sys
    import warnings

    script = ("import torch; torch.cpu._is_amx_fp16_supported = lambda: False\n"
              "from pyllm.cli import main\n"
              f"main(['train', '--preset', 'smoke', '--precision', 'fp16', '--max_steps', '1', '--eval_every', '0',"
              f" '--progress', 'false', '--out_dir', {str(tmp_path)!r}])\n")
    err = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300).stderr
    lines = [line for line in err.splitlines() if "emulated" in line]
    assert len(lines) == 1 and lines[0].startswith("pyllm train: warning: precision='fp16' on a CPU without"), err
    assert "RuntimeWarning" not in err, err

    fmt = cli.warning_formatter("eval")
    assert fmt("m", UserWarning, cli.__file__, 1) == "pyllm eval: warning: m\n"
    other = ("m", UserWarning, "/elsewhere/lib.py", 7)
    assert fmt(*other) == warnings.formatwarning(*other)


def test_interrupt_and_closed_pipe_end_in_one_line(monkeypatch, capsys):
    import subprocess
    import sys
    import types

    def interrupted(argv):
        raise KeyboardInterrupt

    fake = types.ModuleType("pyllm.train.cli")
    fake.main = interrupted
    monkeypatch.setitem(sys.modules, "pyllm.train.cli", fake)
    assert cli.main(["train"]) == 130
    want = "pyllm train: interrupted; running the same command again resumes from its last checkpoint\n"
    assert capsys.readouterr().err == want

    # a reader that closes the pipe early (pyllm plan | head -1): no BrokenPipeError traceback
    script = "import sys; from pyllm.cli import main; sys.exit(main(['plan', '--params', '10M']))"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before anything is read
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_dashed_commands_take_underscored_options_too(capsys):
    """`pyllm train --max_steps` takes config keys; `pyllm pipeline --out_dir` was "unrecognized arguments"."""
    assert cli.dashed(["--out_dir", "x", "--max_documents=5", "--text", "a--b_c", "--seq-len", "--", "--keep_me"]) == [
        "--out-dir", "x", "--max-documents=5", "--text", "a--b_c", "--seq-len", "--", "--keep_me"]
    runs = []
    for power in ([], ["--power_w", "100"], ["--power-w", "100"]):
        assert cli.main(["plan", "--params", "124e6", "--json", *power]) == 0
        runs.append(capsys.readouterr().out)
    assert runs[1] == runs[2] != runs[0]


def test_dashed_commands_have_no_underscored_option(capsys):
    """What makes the rewrite above safe: none of these commands spells an option with an underscore."""
    import re

    for name in cli.DASHED:
        if name == "info":
            continue  # takes no options
        try:
            cli.main([name, "--help"])
        except SystemExit:
            pass
        out = capsys.readouterr().out
        assert "usage:" in out and not re.findall(r"--[a-z0-9]+_[a-z0-9_]+", out), (name, out)
