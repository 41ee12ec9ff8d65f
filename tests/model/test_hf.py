"""Hugging Face interop, both families: a small random transformers model saved with save_pretrained
loads into pyllm with the same logits, and a pyllm model exported with save_hf loads back into
transformers with the same logits. transformers is a test-only dependency."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyllm.model import Transformer, load_hf, preset, save_hf
from pyllm.model.hf import config_from_hf

transformers = pytest.importorskip("transformers")

V = 97


def hf_gpt2(tie=True):
    cfg = transformers.GPT2Config(vocab_size=V, n_layer=2, n_head=4, n_embd=32, n_positions=64,
                                  activation_function="gelu_new", tie_word_embeddings=tie,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


# Llama 3.1's RoPE scaling, with a short original context so that the tiny head dim (8) has one
# frequency in each regime: kept, interpolated and stretched
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}


def hf_llama(rope=None):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                   max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
                                   rope_parameters={"rope_type": "default", **(rope or {}), "rope_theta": 500.0})
    return transformers.LlamaForCausalLM(cfg)


MAKERS = {"gpt2": hf_gpt2, "gpt2_untied": lambda: hf_gpt2(tie=False), "llama_gqa_untied": hf_llama,
          "llama3_rope_scaling": lambda: hf_llama(LLAMA3_ROPE)}


def randomize(model):
    """Large random weights (HF's init is near zero), so any mapping mistake moves the logits a lot."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out


IDX = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", MAKERS)
def test_hf_checkpoint_loads_with_same_logits(family, tmp_path):
    hf = randomize(MAKERS[family]())
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path).eval()
    assert model.cfg.tie_embeddings == hf.config.tie_word_embeddings
    torch.testing.assert_close(logits_of(model, IDX), logits_of(hf, IDX), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, extra", [
    ("tiny", {}), ("tiny", {"tie_embeddings": False}), ("tiny_llama", {}), ("tiny_llama", {"tie_embeddings": True}),
    ("tiny_llama", {"rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_seq_len": 16}}),
])
def test_export_loads_in_transformers_with_same_logits(family, extra, tmp_path):
    torch.manual_seed(0)
    model = Transformer(preset(family, n_layer=2, d_model=32, n_head=4, vocab_size=V, max_seq_len=64, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.eval()
    save_hf(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == (["GPT2LMHeadModel"] if family == "tiny" else ["LlamaForCausalLM"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(hf, IDX), logits_of(model, IDX), rtol=1e-5, atol=1e-5)
    # and back into pyllm: the same model
    again = load_hf(tmp_path)
    assert again.cfg == model.cfg
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_sharded_checkpoint_and_unprefixed_gpt2_keys(tmp_path):
    hf = randomize(hf_llama())
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    torch.testing.assert_close(logits_of(load_hf(tmp_path / "sharded"), IDX), logits_of(hf, IDX),
                               rtol=1e-5, atol=1e-5)
    # the hub's "gpt2" stores the bare GPT2Model: keys without the "transformer." prefix
    gpt2 = randomize(hf_gpt2())
    gpt2.save_pretrained(tmp_path / "gpt2")
    weights = load_file(str(tmp_path / "gpt2" / "model.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()},
              str(tmp_path / "gpt2" / "model.safetensors"))
    torch.testing.assert_close(logits_of(load_hf(tmp_path / "gpt2"), IDX), logits_of(gpt2, IDX), rtol=1e-5, atol=1e-5)


def test_save_over_a_sharded_checkpoint_reads_as_transformers_does(tmp_path):
    # save_hf over an earlier sharded save: the old shards and index stayed, and load_hf read them (the old
    # weights) where transformers reads model.safetensors (the new ones)
    old = randomize(hf_llama())
    old.save_pretrained(tmp_path, max_shard_size="20KB")
    (tmp_path / "model-notes.txt").write_text("not a weight file")
    new = load_hf(tmp_path)  # the same shapes, other weights
    with torch.no_grad():
        for p in new.parameters():
            p.normal_(0.0, 0.3)
    save_hf(new.eval(), tmp_path)
    torch.testing.assert_close(logits_of(load_hf(tmp_path), IDX), logits_of(new, IDX))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits_of(hf, IDX), logits_of(new, IDX), rtol=1e-5, atol=1e-5)
    # only the weight files of the earlier save are gone
    assert sorted(p.name for p in tmp_path.iterdir() if "model" in p.name) == ["model-notes.txt", "model.safetensors"]
    # both files present (a sharded save_pretrained over a single one leaves it): the single file, as transformers
    old.save_pretrained(tmp_path / "both", max_shard_size="20KB")
    save_file(load_file(str(tmp_path / "model.safetensors")), str(tmp_path / "both" / "model.safetensors"))
    (tmp_path / "both" / "config.json").write_text((tmp_path / "config.json").read_text())
    torch.testing.assert_close(logits_of(load_hf(tmp_path / "both"), IDX), logits_of(new, IDX))


def tiny_hf_tokenizer():
    """pyllm's HFTokenizer over a byte-level BPE trained on a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pyllm.tokenizer import HFTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the cat sat on the mat", "a dog and a cat"] * 5, trainer)
    return HFTokenizer(bpe)


def test_export_with_tokenizer_reads_in_auto_tokenizer(tmp_path):
    from pyllm.tokenizer import load_tokenizer

    tok = tiny_hf_tokenizer()
    model = Transformer(preset("tiny", n_layer=1, d_model=32, n_head=4, vocab_size=tok.vocab_size))
    save_hf(model, tmp_path, tokenizer=tok)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the cat and the dog"
    assert auto(text)["input_ids"] == tok.encode(text)
    assert auto.eos_token_id == tok.eos_id
    assert load_tokenizer(tmp_path).encode(text) == tok.encode(text)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == tok.eos_id


@pytest.mark.parametrize("kind", ["hf", "byte"])
def test_exported_tokenizer_reads_special_token_text_as_plain_text(kind, tmp_path):
    from pyllm.tokenizer import ByteTokenizer, load_tokenizer

    tok = tiny_hf_tokenizer() if kind == "hf" else ByteTokenizer()
    save_hf(Transformer(preset("tiny", n_layer=1, d_model=32, n_head=4, vocab_size=tok.vocab_size)), tmp_path,
            tokenizer=tok)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "the cat<|endoftext|>a dog <|user|> sat"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.token_id("<|user|>") not in ids  # pyllm: literal text, not the specials
    assert auto(text)["input_ids"] == auto.encode(text) == ids
    assert load_tokenizer(tmp_path).encode(text) == ids
    # the special ids still work in transformers: eos and padding with it, decoding it as pyllm does
    assert auto.eos_token_id == auto.bos_token_id == auto.pad_token_id == tok.eos_id
    assert auto(["the cat", "a"], padding=True)["input_ids"][1][-1] == tok.eos_id
    with_eos = tok.encode("the cat") + [tok.eos_id]
    assert auto.decode(with_eos) == tok.decode(with_eos) == "the cat<|endoftext|>"
    assert auto.decode(with_eos, skip_special_tokens=True) == "the cat"  # transformers' option; pyllm has none


BAD_HF = {
    "model_type": ({"model_type": "mistral"}, "model_type='mistral' is not supported; pyllm reads 'gpt2' and 'llama'"),
    "rope_scaling": ({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 8.0}},
                     "RoPE scaling 'yarn' is not supported"),
    "activation": ({"model_type": "gpt2", "activation_function": "relu"},
                   "activation_function='relu' is not supported"),
    "act_llama": ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    "bias": ({"model_type": "llama", "attention_bias": True}, "attention_bias/mlp_bias are not supported"),
}


@pytest.mark.parametrize("case", BAD_HF)
def test_unsupported_hf_configs_are_named(case):
    cfg, message = BAD_HF[case]
    with pytest.raises(ValueError, match=message):
        config_from_hf(cfg)


def test_export_of_a_mixed_config_is_refused(tmp_path):
    model = Transformer(preset("tiny", n_layer=1, d_model=32, n_head=4, vocab_size=V, norm="rmsnorm"))
    with pytest.raises(ValueError, match="no Hugging Face architecture matches this config"):
        save_hf(model, tmp_path)


def test_missing_weight_is_named(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="weight 'h.1.mlp.c_fc.weight' missing"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf(tmp_path / "nowhere")


def test_truncated_weights_are_named(tmp_path):
    # a download cut short: one line naming the file, not the safetensors reader's traceback
    hf_gpt2().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_hf(tmp_path)


def test_byte_tokenizer_exports_as_an_equivalent_hf_tokenizer(tmp_path):
    from pyllm.tokenizer import SPECIAL_TOKENS, ByteTokenizer, load_tokenizer

    tok = ByteTokenizer()
    save_hf(Transformer(preset("tiny", n_layer=1, d_model=32, n_head=4, vocab_size=tok.vocab_size)), tmp_path,
            tokenizer=tok)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "héllo wörld\n\t 世界  x~\x7f"
    ids = auto(text)["input_ids"]
    assert ids == tok.encode(text) == list(text.encode("utf-8"))
    assert auto.decode(ids) == text
    assert [auto.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS] == [tok.token_id(s) for s in SPECIAL_TOKENS]
    assert auto.eos_token_id == tok.eos_id
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # pyllm still reads its own kind


def test_weights_config_json_has_no_place_for_are_an_error(tmp_path):
    """config.json saying 1 layer of weights that hold 2: the second layer was silently dropped."""
    hf_gpt2().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match=r"12 weight\(s\) unused by the model config.json describes, e.g. "
                                         r"\['h.1.attn.c_attn.bias'"):
        load_hf(tmp_path)


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


DAMAGED_HF = {
    "no vocab_size": (lambda d: _edit_json(d / "config.json", lambda c: c.pop("vocab_size")),
                      r"config.json: no field 'vocab_size', which model_type 'gpt2' needs"),
    "n_layer a string": (lambda d: _edit_json(d / "config.json", lambda c: c.update(n_layer="2")),
                         r"config.json: ModelConfig: n_layer='2' must be an integer"),
    "wrong vocab_size": (lambda d: _edit_json(d / "config.json", lambda c: c.update(vocab_size=50)),
                         r": the weights do not match config.json \(size mismatch for wte.weight"),
    "index without weight_map": (lambda d: ((d / "model.safetensors.index.json").write_text("{}"),
                                            (d / "model.safetensors").unlink()),  # (the index is read only then)
                                 r"model.safetensors.index.json: not a safetensors index"),
    # a size field the conversion computes with: "32" repeated in 4 * n_embd, the error named d_model or d_ff
    "n_embd a string": (lambda d: _edit_json(d / "config.json", lambda c: c.update(n_embd="32")),
                        r"config.json: n_embd='32' must be a positive integer"),
}


DAMAGED_LLAMA = {
    # was an AttributeError from rope.get
    "rope_parameters a list": ({"rope_parameters": [1]}, r"config.json: rope_parameters=\[1\] must be an object"),
    # was "head_dim=8 x num_attention_heads=4 != hidden_size=32" (the product of a string)
    "heads a string": ({"num_attention_heads": "4"},
                       r"config.json: num_attention_heads='4' must be a positive integer"),
    "heads 0": ({"num_attention_heads": 0, "head_dim": None}, r"num_attention_heads=0 must be a positive integer"),
    "hidden_size null": ({"hidden_size": None}, r"config.json: hidden_size=None must be a positive integer"),
}


@pytest.mark.parametrize("damage", DAMAGED_LLAMA)
def test_damaged_llama_configs_are_one_line_errors_naming_the_field(tmp_path, damage):
    hf_llama().save_pretrained(tmp_path)
    fields, message = DAMAGED_LLAMA[damage]
    _edit_json(tmp_path / "config.json", lambda c: c.update(fields))
    with pytest.raises(ValueError, match=rf"^{tmp_path}.*{message}") as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", DAMAGED_HF)
def test_damaged_hf_directories_are_one_line_errors_naming_the_file(tmp_path, damage):
    hf_gpt2().save_pretrained(tmp_path)
    mutate, message = DAMAGED_HF[damage]
    mutate(tmp_path)
    with pytest.raises(ValueError, match=rf"^{tmp_path}.*{message}") as e:
        load_hf(tmp_path)
    assert "\n" not in str(e.value)
