"""save_model / load_model: the directory format stages hand models over in."""

import json

import pytest
import torch

from pyllm.model import Transformer, load_model, preset, save_model
from pyllm.tokenizer import ByteTokenizer, load_tokenizer


@pytest.mark.parametrize("name", ["tiny", "tiny_llama"])
def test_round_trip(name, tmp_path):
    model = Transformer(preset(name, n_layer=2, d_model=32, n_head=4, vocab_size=ByteTokenizer().vocab_size)).eval()
    save_model(model, tmp_path, tokenizer=ByteTokenizer())
    loaded = load_model(tmp_path).eval()
    assert loaded.cfg == model.cfg
    idx = torch.randint(0, 256, (1, 9))
    assert torch.equal(loaded(idx), model(idx))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)


def test_load_with_dtype_and_overrides(tmp_path):
    model = Transformer(preset("tiny_llama", n_layer=1, d_model=32, n_head=4))
    save_model(model, tmp_path)
    loaded = load_model(tmp_path, dtype=torch.float64, backend="torch", dropout=0.1)
    assert loaded.head_weight.dtype == torch.float64
    assert loaded.cfg.backend == "torch" and loaded.cfg.dropout == 0.1
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        load_model(tmp_path, colour="red")


def test_tied_head_saved_once(tmp_path):
    from safetensors.torch import load_file

    save_model(Transformer(preset("tiny", n_layer=1)), tmp_path)
    assert "lm_head.weight" not in load_file(str(tmp_path / "model.safetensors"))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{\n "pyllm_model": {"n_layer": 2,}\n}')
    with pytest.raises(ValueError, match="config.json: not valid JSON \\(line 2: Expecting property name"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2}))
    with pytest.raises(ValueError, match="neither field 'pyllm_model' \\(pyllm\\) nor 'model_type'"):
        load_model(tmp_path)
    save_model(Transformer(preset("tiny", n_layer=2)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["pyllm_model"]["n_layer"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match config.json"):
        load_model(tmp_path)


def test_shape_mismatch_and_missing_weights_are_named(tmp_path):
    save_model(Transformer(preset("tiny", n_layer=1)), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["pyllm_model"]["vocab_size"] = 300
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match config.json .*size mismatch for wte.weight"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def test_load_model_reads_hugging_face_directories(tmp_path):
    from pyllm.model import save_hf

    model = Transformer(preset("tiny_llama", n_layer=1, d_model=32, n_head=4)).eval()
    save_hf(model, tmp_path)
    loaded = load_model(tmp_path, backend="torch").eval()
    assert loaded.cfg.backend == "torch"
    idx = torch.randint(0, 256, (1, 7))
    torch.testing.assert_close(loaded(idx), model(idx))


def _drop_fields(directory, *names):
    cfg = json.loads((directory / "config.json").read_text())
    for name in names:
        del cfg["pyllm_model"][name]
    (directory / "config.json").write_text(json.dumps(cfg))


def test_missing_config_fields_are_an_error(tmp_path):
    # a config.json without norm and rope_theta loaded GPT-2 small's layernorm and 10000: another model
    model = Transformer(preset("tiny_llama", n_layer=1, d_model=32, n_head=4, rope_theta=5e5)).eval()
    save_model(model, tmp_path)
    _drop_fields(tmp_path, "norm", "rope_theta")
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: 'pyllm_model' lacks field\(s\) "
                                         r"\['norm', 'rope_theta'\]"):
        load_model(tmp_path)
    assert load_model(tmp_path, norm="rmsnorm", rope_theta=5e5).cfg == model.cfg  # overrides supply them
    # fields that do not change what the weights compute, or came later with a default meaning the old behaviour
    save_model(model, tmp_path)
    _drop_fields(tmp_path, "backend", "activation_checkpointing", "fused_loss", "init_std", "rope_scaling")
    idx = torch.randint(0, 256, (1, 7))
    assert torch.equal(load_model(tmp_path).eval()(idx), model(idx))


@pytest.mark.parametrize("value", [[1, 2], None, "tiny"])
def test_pyllm_model_not_an_object_is_named(tmp_path, value):
    # was a TypeError from {**raw["pyllm_model"]}
    (tmp_path / "config.json").write_text(json.dumps({"pyllm_model": value}))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'config.json'}: field 'pyllm_model' must be a JSON object"):
        load_model(tmp_path)


def test_integer_weights_are_refused(tmp_path):
    # int32 tensors were converted into the float parameters without a word
    from safetensors.torch import load_file, save_file

    save_model(Transformer(preset("tiny", n_layer=1, d_model=32, n_head=4)), tmp_path)
    path = tmp_path / "model.safetensors"
    weights = load_file(str(path))
    weights["blocks.0.attn.qkv.weight"] = (weights["blocks.0.attn.qkv.weight"] * 100).to(torch.int32)
    save_file(weights, str(path))
    with pytest.raises(ValueError, match=rf"^{path}: tensor 'blocks.0.attn.qkv.weight' has dtype torch.int32"):
        load_model(tmp_path)


@pytest.mark.parametrize("save", ["save_model", "save_hf"])
def test_tokenizer_with_more_ids_than_the_model_is_refused(tmp_path, save):
    # ByteTokenizer's specials (256..260) had no embedding row in a preset "tiny" model (256): transformers then
    # failed on them with an IndexError
    from pyllm import model as pm

    with pytest.raises(ValueError, match=rf"{save}: the tokenizer has 261 ids but the model's vocab_size is 256"):
        getattr(pm, save)(Transformer(preset("tiny", n_layer=1, d_model=32, n_head=4)), tmp_path, ByteTokenizer())
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("save", ["save_model", "save_hf"])
def test_unmerged_lora_is_refused(tmp_path, save):
    # save_model wrote parametrization keys load_model cannot read; save_hf raised a bare KeyError
    from pyllm import model as pm
    from pyllm.post.lora import LoRAConfig, apply_lora, merge_lora

    model = Transformer(preset("tiny_llama", n_layer=1, d_model=32, n_head=4))
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=rf"{save}: the model has LoRA adapters .*: call "
                                         r"pyllm.post.lora.merge_lora\(model\) first"):
        getattr(pm, save)(model, tmp_path)
    merge_lora(model)
    getattr(pm, save)(model, tmp_path)
    assert load_model(tmp_path).cfg == model.cfg
