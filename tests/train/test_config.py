"""TrainConfig: overrides, presets, validation, schedules, and the CLI's one-line errors."""

from __future__ import annotations

import math

import pytest

from pyllm.train import ConfigError, TrainConfig, parse_overrides, preset
from pyllm.train.cli import main
from pyllm.train.config import build_config
from pyllm.train.schedule import lr_at

from .helpers import make_trainer, tiny_model


def test_overrides_are_typed_and_nested():
    o = parse_overrides(["--lr", "3e-4", "--model.n_layer=6", "--compile", "true", "--micro_batch_size", "none",
                         "--max-steps", "10"])
    assert o == {"lr": 3e-4, "model": {"n_layer": 6}, "compile": True, "micro_batch_size": None, "max_steps": 10}
    cfg = build_config("shakespeare_char_cpu", o)
    assert cfg.model["n_layer"] == 6 and cfg.model["d_model"] == 128  # merged into the preset's model
    assert cfg.model_config(vocab_size=70).n_layer == 6


@pytest.mark.parametrize("args,message", [
    (["--lr_max", "1"], "unknown config key 'lr_max'; did you mean 'lr'?"),
    (["--model.n_layr", "2"], "unknown config key 'model.n_layr'; did you mean 'model.n_layer'?"),
    (["--lr", "fast"], "--lr: 'fast' is not a valid float"),
    (["--compile", "maybe"], "--compile: 'maybe' is not a boolean"),
    (["--lr"], "--lr: missing value"),
])
def test_bad_overrides(args, message):
    with pytest.raises(ConfigError) as e:
        parse_overrides(args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_validation_says_what_to_change():
    with pytest.raises(ConfigError, match="precision='fp8': use one of fp32, bf16, fp16"):
        TrainConfig(precision="fp8")
    with pytest.raises(ConfigError, match="master_weights=True needs precision"):
        TrainConfig(master_weights=True)
    with pytest.raises(ConfigError, match="unknown model field 'n_layers'; did you mean 'n_layer'"):
        TrainConfig(model={"n_layers": 2})
    with pytest.raises(ConfigError, match="unknown train preset 'smok'; did you mean 'smoke'"):
        preset("smok")


def test_batch_size_must_divide():
    assert TrainConfig(batch_size=12, micro_batch_size=3).grad_accum_steps(2) == 2
    with pytest.raises(ConfigError, match=r"batch_size=12 is not divisible by micro_batch_size \(5\) x world_size \(2\)"):
        TrainConfig(batch_size=12, micro_batch_size=5).grad_accum_steps(2)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules(schedule):
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule=schedule, decay_fraction=0.5)
    lrs = [lr_at(cfg, s) for s in range(cfg.max_steps + 1)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)  # linear warmup
    assert lrs[10] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:]))  # never increases after warmup
    end = {"constant": 1.0}.get(schedule, 0.1)
    assert lrs[-1] == pytest.approx(end)
    if schedule == "cosine":
        assert lrs[60] == pytest.approx(0.1 + 0.5 * 0.9 * (1 + math.cos(math.pi * 0.5)))
    if schedule == "wsd":
        assert lrs[55] == 1.0 and lrs[56] < 1.0  # stable until the last half, then linear decay
    if schedule == "linear":
        assert lrs[60] == pytest.approx(0.55)


@pytest.mark.parametrize("fraction,max_steps", [(0.29, 100), (0.57, 10000), (0.1, 7)])
def test_wsd_decays_over_the_stated_fraction(fraction, max_steps):
    # binary floats: 0.29 x 100 is 28.999..., which int() made a decay of 28 steps
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=max_steps, schedule="wsd", decay_fraction=fraction)
    decaying = sum(lr_at(cfg, s) < 1.0 for s in range(max_steps))
    assert decaying == round(fraction * max_steps) - 1  # the first decay step still has the full lr


def test_no_weight_decay_on_norms_biases_embeddings(tmp_path):
    t = make_trainer(tmp_path, model=tiny_model())
    decayed = {n for n, d in zip(t.optimizer.names, t.optimizer.decay) if d}
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.proj.weight" in decayed
    assert not decayed & {"wte.weight", "wpe.weight", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm_f.weight"}


@pytest.mark.parametrize("args,message", [
    (["--data", "{tmp}/missing.txt"], "data path '{tmp}/missing.txt' does not exist"),
    (["--data", "{tmp}/empty.txt"], "data file '{tmp}/empty.txt' is empty"),
    (["--data", "{tmp}/nothing"], "data folder '{tmp}/nothing' has no text files"),
    (["--lr_max", "1"], "unknown config key 'lr_max'; did you mean 'lr'?"),
    (["--preset", "smoke", "--batch_size", "7", "--micro_batch_size", "2"], "TrainConfig: batch_size=7 is not divisible"),
    (["--model.n_head", "3"], "TrainConfig: model: ModelConfig: d_model=128 must be a positive multiple of n_head=3"),
    (["--model.norm", "batchnorm"], "TrainConfig: model: ModelConfig: norm='batchnorm': use 'layernorm' or 'rmsnorm'"),
    (["--out_dir", "{tmp}/empty.txt/run"], "TrainConfig: out_dir='{tmp}/empty.txt/run' cannot be created"),
    # each was a traceback, or a run that trained to NaN or on the wrong data
    (["--data", ""], "TrainConfig: data='' is empty: give a text file, a folder, a token-shard directory or 'builtin'"),
    (["--model.n_head", "0"], "TrainConfig: model: ModelConfig: n_head=0 must be positive"),
    (["--model.d_model", "0"], "TrainConfig: model: ModelConfig: d_model=0 must be a positive multiple of n_head=4"),
    (["--model.d_ff", "0"], "TrainConfig: model: ModelConfig: d_ff=0 must be >= 1"),
    (["--model.init_std", "-1"], "TrainConfig: model: ModelConfig: init_std=-1.0 must be >= 0"),
    (["--model.norm_eps", "0"], "TrainConfig: model: ModelConfig: norm_eps=0.0 must be positive"),
    (["--eps", "nan"], "TrainConfig: eps=nan must be a finite number"),
    (["--lr", "inf"], "TrainConfig: lr=inf must be a finite number"),
    (["--seed", str(2 ** 64)], f"TrainConfig: seed={2 ** 64} must be in [0, 2**63)"),
    (["--device", "gpu"], "TrainConfig: device='gpu': use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--device", "cuda:abc"], "TrainConfig: device='cuda:abc': use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (["--best_metric", "val_los"], "TrainConfig: best_metric='val_los' is not a metric train() evaluates; use one "
                                   "of val_loss"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "nothing").mkdir()
    args = ["--out_dir", str(tmp_path / "run"), "--progress", "false"] + [a.format(tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("pyllm train: error: " + message.format(tmp=tmp_path)) and err.count("\n") == 1


def test_a_text_folder_skips_hidden_entries(tmp_path):
    # a checkout or a folder copied from a Mac: .git objects and .DS_Store are not training text (binary:
    # the run failed on them), README.TXT is
    from pyllm.train.data import read_documents

    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "README.TXT").write_text("second")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01\xff")
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "ab12").write_bytes(b"x\x9c\xff")
    assert read_documents(str(tmp_path)) == ["second", "first"]


def test_cli_checkpoint_of_another_shape_is_one_line(tmp_path, capsys):
    base = ["--preset", "smoke", "--out_dir", str(tmp_path), "--max_steps", "2", "--progress", "false",
            "--eval_every", "0"]
    assert main(base) == 0
    capsys.readouterr()
    assert main(base + ["--max_steps", "4", "--model.d_model", "96"]) == 2
    err = capsys.readouterr().err
    assert "is for a different model shape" in err and err.count("\n") == 1


@pytest.mark.parametrize("native", [True, False])
def test_cpu_preset_uses_bf16_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr("pyllm.train.config.cpu_has_native_bf16", lambda: native)
    assert preset("shakespeare_char_cpu").precision == ("bf16" if native else "fp32")
    assert preset("shakespeare_char_cpu", precision="fp32").precision == "fp32"  # still overridable


def test_a_cuda_device_on_a_machine_without_one_is_a_config_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda' but this machine has no usable CUDA device; use 'cpu'"):
        TrainConfig(device="cuda")


def test_a_large_seed_draws_windows():
    """Seeds up to 2**63 (x 1_000_003, the per-chunk generator's seed) overflowed torch's uint64 seed."""
    from pyllm.train import RandomWindows

    from .helpers import TOKENS

    assert RandomWindows(TOKENS, 16, 2, seed=2 ** 63 - 1).next_batch()["input_ids"].shape == (2, 16)


@pytest.mark.parametrize("field,value,kind", [("max_steps", 2.5, "an integer"), ("lr", "1e-3", "a number"),
                                              ("compile", 1, "a boolean"), ("micro_batch_size", 2.0, "an integer"),
                                              ("data", None, "a string")])
def test_python_api_values_of_the_wrong_type_are_one_line_errors(field, value, kind):
    # the CLI parses each value by its field's type; the Python API takes what it is given
    with pytest.raises(ConfigError, match=f"TrainConfig: {field}={value!r} must be {kind}"):
        TrainConfig(**{field: value})
    assert TrainConfig(lr=1, warmup_steps=0, micro_batch_size=None).lr == 1  # an int is a number; None fits Optional


def test_distributed_none_under_torchrun_is_refused():
    """Each process would train its own model on its share of the data, and rank 0's would be saved."""
    from pyllm.train.distributed import resolve_mode

    with pytest.raises(ValueError, match=r"^distributed='none' with 2 processes \(torchrun\) would train 2 separate"):
        resolve_mode("none", 2)
    assert [resolve_mode(m, 1) for m in ("none", "auto", "ddp", "fsdp")] == ["none"] * 4
    assert resolve_mode("auto", 2) == "ddp" and resolve_mode("fsdp", 2) == "fsdp"
