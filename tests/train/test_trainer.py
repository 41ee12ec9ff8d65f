"""The training loop: learning, precision, loss scaling, accumulation, checkpoints and resume."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pyllm.train import CheckpointError, TrainConfig, train
from pyllm.train.checkpoint import step_dir_name

from .helpers import losses, make_trainer, tiny_model


def test_loss_falls_on_builtin_text(tmp_path):
    """train(cfg) end to end on the built-in text with a char tokenizer: the validation loss drops well
    below the uniform-guess loss ln(V) and the final model directory is written."""
    cfg = TrainConfig(data="builtin", tokenizer="char", seq_len=32, batch_size=8, max_steps=60, lr=3e-3, min_lr=3e-4,
                      warmup_steps=5, eval_every=30, eval_batches=4, log_every=10, progress=False,
                      out_dir=str(tmp_path), device="cpu", model={"n_layer": 2, "n_head": 2, "d_model": 48})
    summary = train(cfg)
    evals = [r for r in summary["history"]]
    assert summary["steps"] == 60 and len(evals) == 6
    vocab = summary_vocab(tmp_path)
    assert summary["eval"]["val_loss"] < 0.75 * math.log(vocab), (summary["eval"], vocab)
    assert losses(summary)[-1] < losses(summary)[0] - 0.5
    assert (tmp_path / "final" / "model.safetensors").is_file() and (tmp_path / "metrics.jsonl").is_file()


def test_validation_set_does_not_depend_on_the_micro_batch_size(tmp_path):
    """eval_batches counts batches of batch_size sequences: with micro-batches of 4 or of 1 the validation
    loss is over the same 8 sequences (it was over eval_batches micro-batches: 8 or 2 sequences)."""
    runs = [train(TrainConfig(data="builtin", tokenizer="byte", seq_len=16, batch_size=4, micro_batch_size=micro,
                              max_steps=1, eval_batches=2, progress=False, out_dir=str(tmp_path / str(micro)),
                              device="cpu", model={"n_layer": 1, "n_head": 2, "d_model": 32}))
            for micro in (4, 1)]
    assert runs[1]["eval"]["val_loss"] == pytest.approx(runs[0]["eval"]["val_loss"], rel=1e-6)


def summary_vocab(out_dir) -> int:
    from pyllm.model import load_model

    return load_model(out_dir / "final").cfg.vocab_size


@pytest.mark.parametrize("precision,master_weights,rel_tol", [
    ("bf16", False, 2e-3), ("fp16", False, 5e-4), ("bf16", True, 4e-3), ("fp16", True, 5e-4)])
def test_low_precision_tracks_fp32(tmp_path, precision, master_weights, rel_tol):
    """bf16/fp16 autocast (and low-precision weights with fp32 masters) follow the fp32 loss curve: every
    step's loss within rel_tol, about 10x the deviation measured on this tiny model over 10 steps
    (bf16 unit roundoff is 3.9e-3, fp16's 4.9e-4)."""
    ref = np.array(losses(make_trainer(tmp_path / "fp32", max_steps=10).fit()))
    run = make_trainer(tmp_path / precision, precision=precision, master_weights=master_weights, max_steps=10)
    low = np.array(losses(run.fit()))
    assert np.all(np.isfinite(low))
    assert np.max(np.abs(low - ref) / ref) < rel_tol
    assert ref[-1] < ref[0] - 0.3  # the curves being compared actually move


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_scaler_skips_inf_step_and_recovers(tmp_path):
    """An injected inf: that step changes no weight and no Adam state, the scale backs off by half and
    the skip is counted; the next step updates again and the scale grows after growth_interval clean steps."""
    inject = {"on": False}

    def loss_fn(model, batch):
        loss = model.loss(batch["input_ids"], batch["targets"])
        return (loss * float("inf") if inject["on"] else loss), {}

    t = make_trainer(tmp_path, precision="fp16", init_scale=1024.0, growth_interval=2, loss_fn=loss_fn)
    t.train_step(1e-3)
    assert t.scaler.scale.item() == 1024.0 and t.optimizer.step_count.item() == 1
    before, adam_before = _snapshot(t.model), [m.clone() for m in t.optimizer.exp_avg]
    inject["on"] = True
    t.train_step(1e-3)
    assert t.scaler.scale.item() == 512.0 and t.scaler.skipped.item() == 1
    assert t.optimizer.step_count.item() == 1  # the skipped step does not count for bias correction
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(torch.equal(a, b) for a, b in zip(t.optimizer.exp_avg, adam_before))
    inject["on"] = False
    loss, grad_norm, _, _ = t.train_step(1e-3)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    assert any(not torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    assert t.scaler.scale.item() == 512.0
    t.train_step(1e-3)
    assert t.scaler.scale.item() == 1024.0  # two clean steps: grown back


def test_grad_accumulation_4x1_equals_1x4(tmp_path):
    """Four micro-batches of one sequence give the same losses and weights as one batch of four."""
    one = make_trainer(tmp_path / "a", batch_size=4, micro_batch_size=4, max_steps=4)
    four = make_trainer(tmp_path / "b", batch_size=4, micro_batch_size=1, max_steps=4)
    assert four.grad_accum == 4
    np.testing.assert_allclose(losses(four.fit()), losses(one.fit()), rtol=1e-5)
    for (k, a), b in zip(one.model.state_dict().items(), four.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=k)


class _Killed(Exception):
    pass


class _KillAfter:
    """A batch source that dies (like a killed process) after ``n`` batches."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def next_batch(self):
        if self.inner.position >= self.n:
            raise _Killed
        return self.inner.next_batch()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])  # bf16: the CPU preset's default
def test_kill_and_resume_gives_identical_losses(tmp_path, precision):
    """Killed after step 6 with checkpoints every 4 steps, then resumed (from a differently initialised
    model): steps 5-8 reproduce the uninterrupted run bit for bit (losses, grad norms, weights)."""
    kw = dict(max_steps=8, ckpt_every=4, precision=precision)
    full = make_trainer(tmp_path / "full", **kw)
    reference = full.fit()["history"]

    killed = make_trainer(tmp_path / "killed", **kw)
    killed.batches = _KillAfter(killed.batches, 6)
    with pytest.raises(_Killed):
        killed.fit()
    resumed = make_trainer(tmp_path / "killed", model=tiny_model(seed=123), **kw)
    history = resumed.fit()["history"]
    assert [r["step"] for r in history] == [5, 6, 7, 8]
    for got, want in zip(history, reference[4:]):
        assert (got["loss"], got["grad_norm"]) == (want["loss"], want["grad_norm"])
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


class _Recording:
    """A batch source that records the first token of every sequence it serves."""

    def __init__(self, inner, seen: list):
        self.inner, self.seen, self.layout_free = inner, seen, getattr(inner, "layout_free", False)

    def next_batch(self):
        batch = self.inner.next_batch()
        self.seen.extend(batch["input_ids"][:, 0].tolist())
        return batch

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


def test_resume_with_another_micro_batch_size_continues_with_the_next_sequences(tmp_path):
    """Checkpointed at step 2 with 1 micro-batch of 4 per step, resumed with 2 of 2 (and 4 of 1): the
    sequences after the checkpoint are those of the uninterrupted run, not a replay of the last step's
    (the data position was once a micro-batch count), and the losses agree up to summation order."""
    kw = dict(batch_size=4, max_steps=4, ckpt_every=2)
    whole_seen: list = []
    whole = make_trainer(tmp_path / "whole", micro_batch_size=4, **kw)
    whole.batches = _Recording(whole.batches, whole_seen)
    reference = whole.fit()["history"]
    first = make_trainer(tmp_path / "part", micro_batch_size=4, **{**kw, "max_steps": 2})
    first.batches = _Recording(first.batches, [])
    first.fit()
    for micro in (2, 1):
        out = tmp_path / f"micro{micro}"
        shutil.copytree(tmp_path / "part", out)
        seen: list = []
        resumed = make_trainer(out, micro_batch_size=micro, **kw)
        resumed.batches = _Recording(resumed.batches, seen)
        history = resumed.fit()["history"]
        assert seen == whole_seen[8:], micro
        np.testing.assert_allclose(losses({"history": history}), losses({"history": reference[2:]}), rtol=1e-5)


def test_resume_with_a_data_position_this_run_cannot_take_is_a_one_line_error(tmp_path):
    make_trainer(tmp_path, batch_size=4, max_steps=1).fit()  # 4 sequences drawn
    cases = [(dict(seed=7), "seed=1337, this run has seed=7"),
             (dict(batch_size=3, micro_batch_size=3), "4 sequences drawn.* micro-batches of 3 x 1")]
    for overrides, message in cases:
        t = make_trainer(tmp_path, max_steps=2, **overrides)
        with pytest.raises(CheckpointError, match=f"checkpoint .*step_00000001: .*{message}") as e:
            t.fit()
        assert "\n" not in str(e.value)


def test_resume_says_where_it_resumed_and_when_nothing_is_left(tmp_path, capsys):
    make_trainer(tmp_path, max_steps=2).fit()
    capsys.readouterr()
    ckpt = tmp_path / "checkpoints" / step_dir_name(2)
    assert make_trainer(tmp_path, max_steps=3).fit()["steps"] == 3
    assert capsys.readouterr().err.startswith(f"resumed from {ckpt} at step 2\n")
    summary = make_trainer(tmp_path, max_steps=2).fit()  # the newest checkpoint is step 3 now
    assert summary["steps"] == 3 and summary["tokens"] == 0
    assert (f"resumed from {tmp_path / 'checkpoints' / step_dir_name(3)} at step 3, which is max_steps=2 or more: "
            "nothing to train (raise max_steps to continue)") in capsys.readouterr().err


def test_a_run_resumed_at_its_last_step_makes_its_final_evaluation(tmp_path):
    """A crash after the final checkpoint, then the same command: nothing is left to train, and the summary (and
    summary.json) gave no evaluation where the unbroken run had one; the pipeline's checks read it."""
    def val(model):
        return {"val_loss": sum(float(p.double().square().sum()) for p in model.parameters())}

    first = make_trainer(tmp_path, max_steps=2, eval_fn=val).fit()
    again = make_trainer(tmp_path, max_steps=2, eval_fn=val).fit()
    assert again["tokens"] == 0 and again["eval"] == first["eval"] != {}
    assert json.loads((tmp_path / "summary.json").read_text())["eval"] == first["eval"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "manifest"])
def test_corrupted_checkpoint_is_named_and_skipped(tmp_path, damage):
    make_trainer(tmp_path, max_steps=6, ckpt_every=2, keep_last=3).fit()
    newest = tmp_path / "checkpoints" / step_dir_name(6)
    target = newest / ("manifest.json" if damage == "manifest" else "model.safetensors")
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        target.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    else:
        target.write_text(raw.decode()[:-20])
    t = make_trainer(tmp_path, max_steps=6, ckpt_every=2)
    with pytest.warns(RuntimeWarning, match=rf"{newest.name} is corrupted .*falling back to {step_dir_name(4)}"):
        assert t.resume()
    assert t.step == 4


def test_checkpoint_keeps_last_n_and_best(tmp_path):
    evals = iter([3.0, 1.0, 2.0, 4.0])
    t = make_trainer(tmp_path, max_steps=8, ckpt_every=2, eval_every=2, keep_last=2,
                     eval_fn=lambda model: {"val_loss": next(evals)})
    t.fit()
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best", step_dir_name(6), step_dir_name(8)]
    import json

    assert json.loads((ckpts / "best" / "manifest.json").read_text())["step"] == 4
    assert not list(ckpts.glob(".tmp*"))


def test_checkpoint_of_another_model_shape_is_a_one_line_error(tmp_path):
    make_trainer(tmp_path, max_steps=2).fit()
    t = make_trainer(tmp_path, model=tiny_model(d_model=48), max_steps=4)
    with pytest.raises(CheckpointError, match="different model shape: wte.weight") as e:
        t.fit()
    assert "\n" not in str(e.value)


def test_metrics_record_fields(tmp_path):
    import json

    make_trainer(tmp_path, precision="fp16", max_steps=2).fit()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "peak_memory_gb"} <= set(rec)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens"] == 2 * 4 * 16


@pytest.mark.parametrize("overrides,exact", [({"activation_checkpointing": True}, True), ({"fused_loss": False}, False)])
def test_memory_options_keep_the_losses(tmp_path, overrides, exact):
    """Activation checkpointing (recompute per block) reproduces the run exactly; the unfused loss path
    (full logits) matches the fused linear+cross-entropy to fp32 rounding."""
    base = losses(make_trainer(tmp_path / "a", max_steps=4).fit())
    other = losses(make_trainer(tmp_path / "b", model=tiny_model(**overrides), max_steps=4).fit())
    if exact:
        assert other == base
    else:
        np.testing.assert_allclose(other, base, rtol=1e-5)


def test_tensorboard_scalars_equal_the_jsonl_records(tmp_path):
    """With tensorboard=True an event file is written whose loss/grad_norm scalars are the logged ones."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = make_trainer(tmp_path, max_steps=4, tensorboard=True).fit()["history"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    for tag in ("loss", "grad_norm"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard stores fp32 scalars
        assert got == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in history]


def test_batch_source_state_tensors_are_routed_out_of_the_json_and_back(tmp_path):
    from pyllm.train.checkpoint import from_json, to_json

    state = {"pos": np.int64(3), "lists": [torch.arange(3), (torch.ones(2, dtype=torch.bool), 1.5)],
             "buf": {"x": torch.randn(2, 3, dtype=torch.bfloat16)}, "arr": np.arange(2)}
    tensors = {}
    as_json = to_json(state, tensors, "data.1")
    assert as_json == {"pos": 3, "lists": [{"__tensor__": "data.1.lists.0"}, [{"__tensor__": "data.1.lists.1.0"}, 1.5]],
                       "buf": {"x": {"__tensor__": "data.1.buf.x"}}, "arr": [0, 1]}
    back = from_json(json.loads(json.dumps(as_json)), tensors, tmp_path)
    assert torch.equal(back["lists"][0], state["lists"][0]) and torch.equal(back["buf"]["x"], state["buf"]["x"])
    assert back["lists"][1][0].dtype == torch.bool and back["pos"] == 3
    with pytest.raises(CheckpointError, match="state.safetensors has no 'data.1.lists.0', which manifest.json refers to"):
        from_json(as_json, {}, tmp_path)
    with pytest.raises(ValueError, match="two tensors .* path 'd.a.b'"):
        to_json({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}}, {}, "d")


@pytest.mark.parametrize("precision,native_bf16,amx_fp16,warns", [
    ("fp32", False, False, False), ("bf16", True, False, False), ("bf16", False, False, True),
    ("fp16", True, False, True), ("fp16", True, True, False)])
def test_emulated_half_precision_on_the_cpu_is_warned_of(tmp_path, monkeypatch, precision, native_bf16, amx_fp16,
                                                         warns):
    """A CPU without units for the chosen half precision emulates its matmuls (fp16 on a Zen 4: 18x slower
    than fp32 for the nanoGPT preset): the Trainer says so instead of silently crawling."""
    import warnings

    monkeypatch.setattr("pyllm.train.config.cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_fp16_supported", lambda: amx_fp16, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, precision=precision, max_steps=1)
    emulated = [w for w in caught if issubclass(w.category, RuntimeWarning) and "emulated" in str(w.message)]
    assert len(emulated) == int(warns), [str(w.message) for w in caught]
    if warns:
        assert f"precision={precision!r}" in str(emulated[0].message)


def test_a_checkpoint_of_another_run_in_the_out_dir_is_refused_in_one_line(tmp_path):
    """Tensor shapes are not enough: a run that finds another run's checkpoint (another stage, start model or
    data) in its out_dir must not continue it; the same run with a new max_steps still resumes."""
    from pyllm.train import RandomWindows, Trainer

    from .helpers import TOKENS, tiny_config

    def trainer(run, max_steps):
        cfg = tiny_config(tmp_path, max_steps=max_steps)
        batches = RandomWindows(TOKENS, cfg.seq_len, cfg.micro_batch(1), cfg.seed)
        return Trainer(tiny_model(), cfg, batches, run=run)

    sft = {"stage": "sft", "model": None, "data": "builtin:reverse"}
    trainer(sft, 2).fit()
    dpo = {"stage": "dpo", "model": "runs/sft/final", "data": "builtin:reverse"}
    with pytest.raises(CheckpointError, match=rf"^out_dir '{tmp_path}' holds a checkpoint of another run "
                                              rf"\({step_dir_name(2)}: stage='sft' \(this run: 'dpo'\), model=None "
                                              r"\(this run: 'runs/sft/final'\)\); give this run a fresh --out_dir"):
        trainer(dpo, 4).fit()
    assert trainer(sft, 3).fit()["resumed_from"] == 2
    # a pretraining run (no ``run``) is told by its data and tokenizer
    make_trainer(tmp_path / "pre", max_steps=1).fit()
    with pytest.raises(CheckpointError, match=r"tokenizer='char' \(this run: 'byte'\)"):
        make_trainer(tmp_path / "pre", max_steps=2, tokenizer="byte").fit()


def test_the_same_data_file_spelled_differently_is_the_same_run(tmp_path, monkeypatch):
    """--data text.txt, ./text.txt and its absolute path are one file; text.txt from another directory is another."""
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    make_trainer(out, data="text.txt", max_steps=1).fit()
    assert make_trainer(out, data="./text.txt", max_steps=2).fit()["resumed_from"] == 1
    assert make_trainer(out, data=str(tmp_path / "text.txt"), max_steps=3).fit()["resumed_from"] == 2
    monkeypatch.chdir(tmp_path / "other")
    with pytest.raises(CheckpointError, match=rf"data='{tmp_path}/text.txt' \(this run: '{tmp_path}/other/text.txt'\)"):
        make_trainer(out, data="text.txt", max_steps=4).fit()


def test_a_misspelled_best_metric_is_warned_of_once(tmp_path):
    t = make_trainer(tmp_path, max_steps=4, eval_every=2, ckpt_every=2, best_metric="val_los",
                     eval_fn=lambda model: {"val_loss": 1.0, "accuracy": 0.5})
    with pytest.warns(RuntimeWarning) as caught:
        t.fit()
    named = [w for w in caught if "best_metric" in str(w.message)]
    assert len(named) == 1 and str(named[0].message) == (
        "best_metric='val_los' is not among the evaluation metrics (val_loss, accuracy): no best checkpoint is kept; "
        "use one of them")


def test_metrics_of_steps_after_the_resumed_checkpoint_are_dropped(tmp_path):
    """Killed at step 8 with the last checkpoint at step 5: the resumed run redoes 6-8, and metrics.jsonl keeps one
    record per step (it kept 1..8, 6, 7, 8, 9, 10), also when the kill cut its last line short."""
    make_trainer(tmp_path, max_steps=8, ckpt_every=5).fit()
    shutil.rmtree(tmp_path / "checkpoints" / step_dir_name(8))  # as if killed just before writing it
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    make_trainer(tmp_path, max_steps=10, ckpt_every=5).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 11))


def test_stale_temporary_checkpoint_directories_are_removed(tmp_path):
    """A write interrupted by a kill leaves .tmp-step_*-<pid>: removed at the next start unless its process lives."""
    import os
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()
    ckpts = tmp_path / "checkpoints"
    stale, live = ckpts / f".tmp-{step_dir_name(3)}-{dead.pid}", ckpts / f".tmp-{step_dir_name(3)}-{os.getppid()}"
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"partial")
    make_trainer(tmp_path, max_steps=1).fit()
    assert not stale.exists() and live.exists()


def test_a_checkpoint_moved_aside_by_an_interrupted_re_save_is_put_back(tmp_path):
    """Re-saving step N moves step_N to .old-step_N-<pid> first: a kill before the new one is in place leaves the
    only copy there (put back at the next start); a kill after leaves a redundant copy (deleted)."""
    import os
    import subprocess

    from pyllm.train.checkpoint import CheckpointManager

    make_trainer(tmp_path, max_steps=4, ckpt_every=2).fit()
    dead = subprocess.Popen(["true"])
    dead.wait()
    ckpts = tmp_path / "checkpoints"
    only = ckpts / f".old-{step_dir_name(4)}-{dead.pid}"
    os.replace(ckpts / step_dir_name(4), only)
    redundant = ckpts / f".old-{step_dir_name(2)}-{dead.pid}"
    shutil.copytree(ckpts / step_dir_name(2), redundant)
    manager = CheckpointManager(ckpts, keep_last=3)
    manager.remove_stale_temps()
    assert sorted(p.name for p in ckpts.iterdir()) == [step_dir_name(2), step_dir_name(4)]
    assert manager.latest_valid() == ckpts / step_dir_name(4)


def test_resuming_with_other_settings_names_them_in_one_warning(tmp_path):
    """A longer max_steps stretches the cosine schedule (the lr jumps on resume): allowed, but said."""
    make_trainer(tmp_path, max_steps=4, ckpt_every=2).fit()
    t = make_trainer(tmp_path, max_steps=6, lr=1e-3, keep_last=5)  # keep_last changes nothing trained: not named
    with pytest.warns(RuntimeWarning, match=rf"^resuming from {tmp_path}/checkpoints/{step_dir_name(4)} with settings "
                                            r"that differ from its run: lr 0.003 -> 0.001; max_steps 4 -> 6$"):
        t.resume()
