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
