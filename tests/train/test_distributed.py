"""Two CPU processes (gloo) with DDP or FSDP2 reproduce one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyllm.train import CheckpointError
from pyllm.train.run import val_loss_fn

from .helpers import VAL_BATCHES, losses, make_trainer, tiny_model, val_eval


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankTensorState:
    """Batches whose state holds a tensor that differs per rank (as an RL rollout buffer does): each rank
    must get its own back from state.safetensors on resume."""

    def __init__(self, inner, rank: int):
        self.inner, self.rank = inner, rank
        self.served = torch.zeros(0, dtype=torch.int64)

    def next_batch(self):
        self.served = torch.cat([self.served, torch.tensor([self.inner.position * 10 + self.rank])])
        return self.inner.next_batch()

    def state_dict(self):
        return {**self.inner.state_dict(), "served": self.served}

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)
        self.served = state["served"]


def _train_and_resume(mode: str, rank: int, world_size: int, out_dir: str, kwargs: dict) -> None:
    t = make_trainer(out_dir, rank=rank, world_size=world_size, distributed=mode, eval_fn=val_eval(), **kwargs)
    t.batches = _RankTensorState(t.batches, rank)
    if mode == "fsdp":  # really sharded: each rank holds DTensor shards of every parameter
        assert all(hasattr(p, "full_tensor") for p in t.model.parameters())
    else:
        assert isinstance(t.wrapped, torch.nn.parallel.DistributedDataParallel)
    summary = t.fit()
    # validation shared out over the ranks (each evaluates every other batch) equals every rank doing all
    whole = t.evaluate()["val_loss"]
    t.eval_fn = val_loss_fn(VAL_BATCHES, rank, world_size)
    assert t.evaluate()["val_loss"] == pytest.approx(whole, rel=1e-6)
    full = t.full_state_dict()
    # a fresh, differently initialised run resumes the step-4 checkpoint into its own shards
    again = make_trainer(out_dir, model=tiny_model(seed=5), rank=rank, world_size=world_size, distributed=mode,
                         **kwargs)
    again.batches = _RankTensorState(again.batches, rank)
    assert again.resume() and again.step == 4
    assert torch.equal(again.batches.served, t.batches.served) and len(t.batches.served) == 8
    for k, v in again.full_state_dict().items():
        assert torch.equal(v, full[k]), k
    for a, b in zip(again.optimizer.state_tensors().values(), t.optimizer.state_tensors().values()):
        assert torch.equal(a.full_tensor() if hasattr(a, "full_tensor") else a,
                           b.full_tensor() if hasattr(b, "full_tensor") else b)
    if rank == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"losses": losses(summary), "weights": {k: v.tolist() for k, v in full.items()},
                       "eval": summary["eval"]}, f)


def _worker(rank: int, world_size: int, port: int, out_dir: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:  # both modes in one process group: spawning processes is the slow part of this test
        for mode in MODES:
            _train_and_resume(mode, rank, world_size, os.path.join(out_dir, mode), kwargs)
    finally:
        dist.destroy_process_group()


MODES = ("ddp", "fsdp")


def test_two_processes_match_one(tmp_path):
    """Global batch 4: 2 ranks x 1 sequence x 2 accumulation steps vs 1 rank x 4 sequences, with DDP and
    with FSDP2. Same losses (averaged over ranks), validation loss and final weights, up to fp32
    summation order. Each run checkpoints at steps 2 and 4, evaluates (FSDP: the root unit is unsharded
    around eval_fn), gathers its final weights from the shards, and a fresh run resumes the checkpoint
    into its own shards exactly."""
    kw = dict(batch_size=4, micro_batch_size=1, max_steps=4, ckpt_every=2, eval_every=2)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), kw), nprocs=2, join=True)
    one = make_trainer(tmp_path / "one", batch_size=4, micro_batch_size=4, max_steps=4, eval_every=2,
                       eval_fn=val_eval())
    summary = one.fit()
    for mode in MODES:
        two = json.loads((tmp_path / mode / "result.json").read_text())
        np.testing.assert_allclose(two["losses"], losses(summary), rtol=1e-5, err_msg=mode)
        assert two["eval"]["val_loss"] == pytest.approx(summary["eval"]["val_loss"], rel=1e-5), mode
        for k, v in one.model.state_dict().items():
            torch.testing.assert_close(torch.tensor(two["weights"][k]), v, rtol=1e-4, atol=1e-5, msg=f"{mode} {k}")
        assert (tmp_path / mode / "checkpoints" / "step_00000004" / "manifest.json").is_file()
    # one process resumes the two processes' step-2 checkpoint: the same sequences and losses as the one-process
    # run (RandomWindows' state is a global count); a batch source with a state per rank is refused
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000004")
    per_rank = make_trainer(resumed_dir, batch_size=4, micro_batch_size=4, max_steps=4)
    per_rank.batches = _RankTensorState(per_rank.batches, 0)
    with pytest.raises(CheckpointError, match="written by 2 rank.*this run has 1.*_RankTensorState"):
        per_rank.resume()
    resumed = make_trainer(resumed_dir, batch_size=4, micro_batch_size=4, max_steps=4).fit()
    assert resumed["resumed_from"] == 2
    np.testing.assert_allclose(losses(resumed), losses(summary)[2:], rtol=1e-5)
