"""The Hugging Face checkpoint format, from and to local directories (no hub access).

``load_hf(dir)`` reads a GPT-2 (``GPT2LMHeadModel``) or Llama (``LlamaForCausalLM``) checkpoint -
``config.json`` plus ``model.safetensors`` or, when there is none (transformers' order), sharded
``model-*.safetensors`` with ``model.safetensors.index.json`` - into a pyllm ``Transformer``.
``save_hf(model, dir, tokenizer)`` writes a pyllm model back in that format, which transformers,
lm-evaluation-harness and vLLM read.

Layout differences handled here:
- GPT-2 stores its linear layers as ``Conv1D`` with weights (in, out): pyllm's are (out, in).
- pyllm fuses the attention input projection: ``attn.qkv`` rows are [q heads | k heads | v heads],
  which is GPT-2's ``c_attn`` order and Llama's q_proj, k_proj, v_proj stacked.
- pyllm fuses Llama's gate and up projections: ``mlp.fc`` rows are [gate | up].
- Llama checkpoints on the hub use the "rotate half" RoPE layout, the one ``ops.rope`` implements;
  Llama 3.1/3.2's "llama3" RoPE scaling maps to ``ModelConfig.rope_scaling``. Other RoPE scalings
  (yarn, dynamic...) and GPT-2/Llama variants pyllm cannot express are refused with the field named.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from pyllm.data.jsonl import read_json_object
from pyllm.typecheck import type_problem

from .config import ModelConfig
from .transformer import Transformer

_GPT2_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "none"}
# buffers some transformers versions saved with the weights (GPT-2's causal masks, Llama's RoPE frequencies):
# pyllm computes them, so they are not weights left unused
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


# ------------------------------------------------------------------------------------------ configs


def _check_sizes(hf: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Size fields the conversion computes with are positive integers: a string "4" would repeat in 4 * n, not
    multiply, and the error would name a product. ``optional`` ones may also be absent or null."""
    for name in required + tuple(n for n in optional if hf.get(n) is not None):
        if type_problem(hf[name], int) is not None or hf[name] <= 0:
            raise ValueError(f"config.json: {name}={hf[name]!r} must be a positive integer")


def config_from_hf(hf: dict, **overrides) -> ModelConfig:
    """A pyllm ModelConfig from a Hugging Face config.json dict (model_type "gpt2" or "llama").

    Dropout is not carried over (GPT-2's 0.1 is for training from scratch); pass ``dropout=`` to
    fine-tune with it. ``overrides`` replace any field (e.g. backend).
    """
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_GELU:
            raise ValueError(f"config.json: activation_function={act!r} is not supported; "
                             f"use one of {sorted(_GPT2_GELU)}")
        for field, default in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                               ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
            if hf.get(field, default) != default:
                raise ValueError(f"config.json: {field}={hf[field]} is not supported (pyllm needs {default})")
        _check_sizes(hf, ("n_embd",), optional=("n_inner",))
        fields = dict(vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
                      d_model=hf["n_embd"], d_ff=hf.get("n_inner") or 4 * hf["n_embd"],
                      max_seq_len=hf.get("n_positions", hf.get("n_ctx", 1024)), norm="layernorm",
                      mlp="gelu", gelu_approximate=_GPT2_GELU[act], pos="learned", bias=True,
                      tie_embeddings=hf.get("tie_word_embeddings", True),
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5), dropout=0.0)
    elif kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (Llama uses 'silu')")
        if hf.get("attention_bias", False) or hf.get("mlp_bias", False):
            raise ValueError("config.json: attention_bias/mlp_bias are not supported (pyllm's Llama has no biases)")
        # transformers >= 5 nests RoPE settings in rope_parameters; older versions keep them top level
        rope_field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
        rope = hf.get(rope_field) or {}
        if not isinstance(rope, dict):
            raise ValueError(f"config.json: {rope_field}={rope!r} must be an object (RoPE settings by name)")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"config.json: RoPE scaling {rope_type!r} is not supported (plain RoPE or 'llama3')")
        rope_scaling = None if rope_type == "default" else {
            "factor": rope["factor"], "low_freq_factor": rope["low_freq_factor"],
            "high_freq_factor": rope["high_freq_factor"],
            "original_max_seq_len": rope["original_max_position_embeddings"]}
        _check_sizes(hf, ("num_attention_heads", "hidden_size"), optional=("head_dim",))
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        if head_dim * heads != hf["hidden_size"]:
            raise ValueError(f"config.json: head_dim={head_dim} x num_attention_heads={heads} != "
                             f"hidden_size={hf['hidden_size']}; pyllm needs them equal")
        fields = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=heads,
                      n_kv_head=hf.get("num_key_value_heads") or heads, d_model=hf["hidden_size"],
                      d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                      norm="rmsnorm", mlp="swiglu", pos="rope",
                      rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                      rope_scaling=rope_scaling, bias=False,
                      tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
                      dropout=0.0)
    else:
        raise ValueError(f"config.json: model_type={kind!r} is not supported; pyllm reads 'gpt2' and 'llama'")
    return ModelConfig(**{**fields, **overrides})


def _family(cfg: ModelConfig) -> str:
    if (cfg.norm, cfg.mlp, cfg.pos, cfg.bias, cfg.n_kv_head) == ("layernorm", "gelu", "learned", True, cfg.n_head):
        return "gpt2"
    if (cfg.norm, cfg.mlp, cfg.pos, cfg.bias) == ("rmsnorm", "swiglu", "rope", False):
        return "llama"
    raise ValueError(f"no Hugging Face architecture matches this config (norm={cfg.norm}, mlp={cfg.mlp}, "
                     f"pos={cfg.pos}, bias={cfg.bias}, n_kv_head={cfg.n_kv_head}): GPT-2 needs layernorm, "
                     f"gelu, learned, bias=True, n_kv_head=n_head; Llama needs rmsnorm, swiglu, rope, bias=False")


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The Hugging Face config.json dict of a pyllm config (GPT-2 or Llama family)."""
    dtype_name = str(dtype).replace("torch.", "")
    # "dtype" is read by transformers >= 5, "torch_dtype" by older versions and vLLM; token ids are
    # filled in by save_hf from the tokenizer (else transformers assumes GPT-2's 50256)
    common = {"dtype": dtype_name, "torch_dtype": dtype_name, "bos_token_id": None, "eos_token_id": None}
    rope = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        sc = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": sc["factor"], "low_freq_factor": sc["low_freq_factor"],
                "high_freq_factor": sc["high_freq_factor"],
                "original_max_position_embeddings": sc["original_max_seq_len"]}
    if _family(cfg) == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.d_model, "n_inner": cfg.d_ff,
                "n_positions": cfg.max_seq_len, "n_ctx": cfg.max_seq_len,
                "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
                "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": 0.0,
                **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "hidden_size": cfg.d_model, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "attention_bias": False, "mlp_bias": False,
            # both spellings of the RoPE base: transformers >= 5 reads rope_parameters, vLLM and older
            # transformers read rope_theta
            "rope_theta": cfg.rope_theta, "rope_scaling": None if cfg.rope_scaling is None else rope,
            "rope_parameters": {**rope, "rope_theta": cfg.rope_theta},
            **common}


# ------------------------------------------------------------------------------------- state dicts


class _Reads(dict):
    """Weights by name that remember which were read: what a conversion leaves unread is reported."""

    def __init__(self, weights: dict):
        super().__init__(weights)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


def _from_gpt2(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    # Checkpoints of GPT2LMHeadModel prefix "transformer."; those of the bare GPT2Model (the hub's
    # "gpt2") do not. Conv1D weights are (in, out): transpose to nn.Linear's (out, in).
    sd = _Reads({k.removeprefix("transformer."): v for k, v in hf.items()})
    out = {"wte.weight": sd["wte.weight"], "wpe.weight": sd["wpe.weight"],
           "norm_f.weight": sd["ln_f.weight"], "norm_f.bias": sd["ln_f.bias"]}
    for i in range(cfg.n_layer):
        h, p = f"h.{i}.", f"blocks.{i}."
        for src, dst in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[p + dst + ".weight"], out[p + dst + ".bias"] = sd[h + src + ".weight"], sd[h + src + ".bias"]
        for src, dst in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                         ("mlp.c_proj", "mlp.proj")):
            out[p + dst + ".weight"] = sd[h + src + ".weight"].t()
            out[p + dst + ".bias"] = sd[h + src + ".bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    _check_all_read(sd, out)
    return out


def _check_all_read(sd: _Reads, out: dict[str, torch.Tensor]) -> None:
    """A weight the config has no place for (config.json says fewer layers than the weights hold) is an error,
    not silently dropped. A tied checkpoint may carry the output head as a copy of the embedding."""
    unread = sorted(k for k in set(sd) - sd.read if not k.endswith(_BUFFERS))
    if "lm_head.weight" in unread and torch.equal(sd["lm_head.weight"], out["wte.weight"]):
        unread.remove("lm_head.weight")
    if unread:
        raise ValueError(f"{len(unread)} weight(s) unused by the model config.json describes, e.g. {unread[:3]} "
                         "(does config.json match the weights?)")


def _to_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    t = "transformer."
    out = {t + "wte.weight": sd["wte.weight"], t + "wpe.weight": sd["wpe.weight"],
           t + "ln_f.weight": sd["norm_f.weight"], t + "ln_f.bias": sd["norm_f.bias"]}
    for i in range(cfg.n_layer):
        h, p = f"{t}h.{i}.", f"blocks.{i}."
        for dst, src in (("ln_1", "norm1"), ("ln_2", "norm2")):
            out[h + dst + ".weight"], out[h + dst + ".bias"] = sd[p + src + ".weight"], sd[p + src + ".bias"]
        for dst, src in (("attn.c_attn", "attn.qkv"), ("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"),
                         ("mlp.c_proj", "mlp.proj")):
            out[h + dst + ".weight"] = sd[p + src + ".weight"].t()
            out[h + dst + ".bias"] = sd[p + src + ".bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def _from_llama(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    sd = _Reads({k.removeprefix("model."): v for k, v in hf.items()})
    out = {"wte.weight": sd["embed_tokens.weight"], "norm_f.weight": sd["norm.weight"]}
    for i in range(cfg.n_layer):
        h, p = f"layers.{i}.", f"blocks.{i}."
        out[p + "norm1.weight"] = sd[h + "input_layernorm.weight"]
        out[p + "norm2.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[p + "attn.qkv.weight"] = torch.cat([sd[h + f"self_attn.{n}_proj.weight"] for n in "qkv"])
        out[p + "attn.proj.weight"] = sd[h + "self_attn.o_proj.weight"]
        out[p + "mlp.fc.weight"] = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
        out[p + "mlp.proj.weight"] = sd[h + "mlp.down_proj.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    _check_all_read(sd, out)
    return out


def _to_llama(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["norm_f.weight"]}
    q_rows, kv_rows = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        h, p = f"model.layers.{i}.", f"blocks.{i}."
        out[h + "input_layernorm.weight"] = sd[p + "norm1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[p + "norm2.weight"]
        q, k, v = sd[p + "attn.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        for name, w in zip("qkv", (q, k, v)):
            out[h + f"self_attn.{name}_proj.weight"] = w
        out[h + "self_attn.o_proj.weight"] = sd[p + "attn.proj.weight"]
        gate, up = sd[p + "mlp.fc.weight"].chunk(2)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = sd[p + "mlp.proj.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


# ------------------------------------------------------------------------------------------ load/save


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    # the single file first, as transformers reads it: both may be there after a save over an older one
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):  # (AttributeError: not an object)
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map' object: tensor -> file)")
        files = sorted(set(weight_map.values()))
    else:
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors checkpoints are read; convert .bin files first)")
    from .io import load_weights  # (io imports this module)

    weights = {}
    for f in files:
        weights.update(load_weights(directory / f))
    return weights


def load_hf(directory: str | Path, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """Load a local Hugging Face GPT-2 or Llama checkpoint into a pyllm Transformer."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    raw = read_json_object(cfg_path)
    try:
        cfg = config_from_hf(raw, **overrides)
    except KeyError as e:
        raise ValueError(f"{cfg_path}: no field {e.args[0]!r}, which model_type {raw.get('model_type')!r} "
                         "needs") from None
    except ValueError as e:  # config_from_hf's and ModelConfig's messages, given the file's full path
        raise ValueError(f"{cfg_path}: {str(e).removeprefix('config.json: ')}") from None
    weights = _read_weights(directory)
    convert = _from_gpt2 if _family(cfg) == "gpt2" else _from_llama
    try:
        state = convert(weights, cfg)
    except KeyError as e:
        raise ValueError(f"{directory}: weight {e.args[0]!r} missing from the safetensors files "
                         f"(does config.json match the weights?)") from None
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None
    model = Transformer(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # a tensor of another shape than config.json gives it (vocab_size, widths)
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise ValueError(f"{directory}: the weights do not match config.json ({detail})") from None
    return model.to(device=device, dtype=dtype)


def byte_tokenizer_as_hf(tokenizer):
    """A ``tokenizers`` equivalent of pyllm's ByteTokenizer (ids = UTF-8 byte values, then the specials):
    byte-level BPE with no merges. Byte-level BPE shows byte b as a printable character (b itself for
    the printable Latin-1 range, 256 + n for the n-th other byte), as GPT-2 does."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    others = [b for b in range(256) if b not in printable]
    vocab = {chr(b) if b in printable else chr(256 + others.index(b)): b for b in range(256)}
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.specials, key=tokenizer.specials.get)  # added in id order: 256, 257, ...
    hf.add_special_tokens([AddedToken(t, special=True) for t in specials])
    return hf


def save_hf(model: Transformer, directory: str | Path, tokenizer=None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint (config.json + model.safetensors) in its own dtype.

    With an ``HFTokenizer`` or a ``ByteTokenizer`` (converted by ``byte_tokenizer_as_hf``), also writes
    tokenizer.json, tokenizer_config.json and generation_config.json (eos), so that ``AutoTokenizer``
    and generation in other tools work. As in pyllm, special-token strings in a text encode there as plain
    text (``split_special_tokens``): append ``eos_token_id`` to ids, not the ``eos_token`` string to a text.
    A char tokenizer has no Hugging Face equivalent here and is saved only in pyllm's format.
    """
    from pyllm.tokenizer import EOS, ByteTokenizer, HFTokenizer

    from .io import check_savable  # (io imports this module)

    check_savable(model, tokenizer, "save_hf")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    dtype = model.head_weight.dtype
    state = {k: v.detach() for k, v in model.state_dict().items()}
    hf_state = (_to_gpt2 if _family(cfg) == "gpt2" else _to_llama)(state, cfg)
    save_file({k: v.contiguous().cpu() for k, v in hf_state.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    # the shards and index of an earlier sharded save here hold other weights: remove them, as transformers'
    # save_pretrained removes the shards it does not rewrite (only these weight-file names)
    for path in directory.iterdir():
        if path.is_file() and (path.name == "model.safetensors.index.json"
                               or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", path.name)):
            path.unlink()
    hf_cfg = config_to_hf(cfg, dtype)
    if tokenizer is not None:
        tokenizer.save(directory)
        hf_cfg.update(bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id)
        if isinstance(tokenizer, ByteTokenizer):
            byte_tokenizer_as_hf(tokenizer).save(str(directory / "tokenizer.json"))
        if isinstance(tokenizer, (HFTokenizer, ByteTokenizer)):
            # pyllm encodes special-token strings in a text as plain text; tokenizer.json cannot say so
            # (tokenizers does not save encode_special_tokens), transformers' split_special_tokens does
            (directory / "tokenizer_config.json").write_text(json.dumps({
                "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
                "pad_token": EOS, "unk_token": None, "model_max_length": cfg.max_seq_len,
                "split_special_tokens": True}, indent=1))
            (directory / "generation_config.json").write_text(json.dumps({
                "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id}, indent=1))
    (directory / "config.json").write_text(json.dumps(hf_cfg, indent=1))
    return directory
