"""save_model / load_model: the directory format stages hand models over in."""

import json

import pytest
import torch

from pyllm.model import Transformer, load_model, preset, save_model
from pyllm.tokenizer import ByteTokenizer, load_tokenizer


@pytest.mark.parametrize("name", ["tiny", "tiny_llama"])
def test_round_trip(name, tmp_path):
    model = Transformer(preset(name, n_layer=2, d_model=32, n_head=4)).eval()
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
