"""What a user sees under torchrun: an error every process finds alike is printed once per node (by its
local rank 0), one that may be a single process's own names its rank, and an FSDP2 run prints no warning
about its blocks' outputs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyllm.post import cli as post_cli
from pyllm.post.sft import SFTConfig
from pyllm.train import CheckpointError
from pyllm.train import cli as train_cli
from pyllm.train import run


def _torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 -m pyllm.cli <args>`` on the CPU; warnings shown as Python shows them."""
    env = {**os.environ, "PYTHONWARNINGS": "default", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pyllm.cli",
           *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_config_error_under_torchrun_is_printed_once(tmp_path):
    proc = _torchrun(tmp_path, "train", "--bogus_key", "1")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count("pyllm train: error: unknown config key 'bogus_key'") == 1, out
    assert "rank 0: pyllm" not in out and "rank 1: pyllm" not in out, out


@pytest.mark.slow
def test_fsdp_run_under_torchrun_prints_no_view_warning(tmp_path):
    """FSDP2 warned once per process that a block (FSDPBlock) returned a view tensor: its MLP's output projection,
    a view of the linear op's 2-D result, which nothing modifies in place."""
    proc = _torchrun(tmp_path, "train", "--preset", "smoke", "--distributed", "fsdp", "--device", "cpu",
                     "--max_steps", "2", "--batch_size", "4", "--eval_every", "0", "--progress", "false",
                     "--out_dir", "run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert out.count("pyllm train: done") == 1, out
    assert "view tensor" not in out, out


def _as_rank(monkeypatch, rank: int, nodes: int = 1) -> None:
    """What torchrun sets for process ``rank`` of 2 per node on ``nodes`` nodes."""
    for key, value in (("RANK", rank), ("LOCAL_RANK", rank % 2), ("WORLD_SIZE", 2 * nodes), ("LOCAL_WORLD_SIZE", 2)):
        monkeypatch.setenv(key, str(value))


@pytest.mark.parametrize("rank", [0, 1])
def test_train_cli_prints_a_config_error_from_rank_0_only(monkeypatch, capsys, rank):
    _as_rank(monkeypatch, rank)
    assert train_cli.main(["--bogus_key", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyllm train: error: unknown config key 'bogus_key'") if rank == 0 else err == ""


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_on_several_nodes_a_config_error_is_printed_once_per_node(monkeypatch, capsys, rank):
    """Another node may lack a file the config names: its local rank 0 prints too, naming its rank."""
    _as_rank(monkeypatch, rank, nodes=2)
    assert train_cli.main(["--bogus_key", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rank {rank}: pyllm train: error: unknown config key") if rank % 2 == 0 else err == ""


def test_train_cli_names_the_rank_of_an_error_in_training(monkeypatch, capsys):
    """Errors from train() may be one process's own (its shards, its checkpoint files): each names its rank."""
    def fail(cfg):
        raise CheckpointError("state_rank1.safetensors is missing from checkpoints/step_00000004")

    monkeypatch.setattr(run, "train", fail)
    _as_rank(monkeypatch, 1)
    assert train_cli.main(["--max_steps", "2"]) == 2
    assert capsys.readouterr().err == ("rank 1: pyllm train: error: state_rank1.safetensors is missing from "
                                       "checkpoints/step_00000004\n")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key)  # one process: no rank
    assert train_cli.main(["--max_steps", "2"]) == 2
    assert capsys.readouterr().err.startswith("pyllm train: error: state_rank1")


def test_post_cli_prints_config_errors_once_and_names_the_rank_of_others(monkeypatch, capsys):
    def fail(cfg):
        raise FileNotFoundError("data.jsonl not found")

    monkeypatch.setattr(post_cli, "_stages", lambda: {"sft": (SFTConfig, fail)})
    for rank in (0, 1):
        _as_rank(monkeypatch, rank)
        assert post_cli.main(["sft", "--bogus_key", "1"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pyllm sft: error: unknown config key 'bogus_key'") if rank == 0 else err == ""
        assert post_cli.main(["sft", "--max_steps", "2"]) == 2
        assert capsys.readouterr().err == f"rank {rank}: pyllm sft: error: data.jsonl not found\n"


@pytest.mark.parametrize("rank", [0, 1])
def test_post_stage_refuses_fsdp_under_torchrun_when_parsed(monkeypatch, capsys, rank):
    """The FSDP refusal of the post-training stages came from inside run(): each process printed it, and the two
    lines ran together ("...for pretrainingrank 1: pyllm sft: error..."). It is found when the config is made."""
    _as_rank(monkeypatch, rank)
    with pytest.raises(ValueError, match=r"SFTConfig: post-training stages run data-parallel with DDP"):
        SFTConfig(train={"distributed": "fsdp"})
    monkeypatch.setattr(post_cli, "_stages", lambda: {"sft": (SFTConfig, lambda cfg: pytest.fail("ran"))})
    assert post_cli.main(["sft", "--distributed", "fsdp"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyllm sft: error: SFTConfig: post-training") and err.count("\n") == 1 if rank == 0 \
        else err == ""
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key)
    assert SFTConfig(train={"distributed": "fsdp"}).train["distributed"] == "fsdp"  # one process: nothing to shard
