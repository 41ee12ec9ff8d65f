"""The inter-stage model format: a directory with ``config.json`` (pyllm's ModelConfig),
``model.safetensors`` (pyllm's parameter names) and, optionally, the tokenizer files.

Every stage hands its result to the next this way (pretraining -> SFT -> DPO -> eval). The Hugging
Face format, for other tools, is in ``hf.py``; ``load_model`` reads it too, so every stage also accepts
a local Hugging Face GPT-2 or Llama directory.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from pyllm.data.jsonl import read_json_object

from .config import ModelConfig
from .transformer import Transformer

# Fields config.json's "pyllm_model" may leave out. They do not change the function the weights compute
# (backend, activation_checkpointing, fused_loss; init_std only initialises the weights the file replaces), or
# came after the first files were written and default to what those files meant (rope_scaling: None is the plain
# RoPE of every file before it). Every save_model wrote all other fields; a missing one would silently take
# ModelConfig's default (GPT-2 small's: layernorm, rope_theta 10000, ...) and give another model.
_OPTIONAL_FIELDS = {"backend", "activation_checkpointing", "fused_loss", "init_std", "rope_scaling"}


def check_savable(model: Transformer, tokenizer=None, caller: str = "save_model") -> None:
    """Refuse to write what could not be read back: unmerged LoRA adapters (parametrized weights, saved under
    names no loader knows) and a tokenizer with ids beyond the model's embedding rows."""
    # (detected through torch's parametrize: pyllm.model sits below pyllm.post and does not import it)
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        raise ValueError(f"{caller}: the model has LoRA adapters (parametrized weights): call "
                         "pyllm.post.lora.merge_lora(model) first")
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise ValueError(f"{caller}: the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.cfg.vocab_size}: ids from {model.cfg.vocab_size} on have no embedding row; "
                         f"build the model with vocab_size >= {tokenizer.vocab_size}")


def save_model(model: Transformer, directory: str | Path, tokenizer=None) -> Path:
    check_savable(model, tokenizer, "save_model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"pyllm_model": model.cfg.to_dict()}, indent=1))
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a damaged one (an interrupted copy or download) is a one-line
    ValueError naming it, not the reader's traceback."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); it is damaged or incomplete, copy "
                         "or write it again") from None


def load_model(directory: str | Path, device="cpu", dtype=torch.float32, **overrides) -> Transformer:
    """Load a model written by ``save_model``, or a Hugging Face GPT-2/Llama checkpoint (through
    ``hf.load_hf``). ``overrides`` replace config fields (e.g. backend)."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a pyllm model directory)")
    raw = read_json_object(cfg_path)
    if "pyllm_model" not in raw and "model_type" in raw:  # a Hugging Face checkpoint (GPT-2, Llama)
        from .hf import load_hf

        return load_hf(directory, device, dtype, **overrides)
    if "pyllm_model" not in raw:
        raise ValueError(f"{cfg_path}: neither field 'pyllm_model' (pyllm) nor 'model_type' (Hugging Face) found")
    fields = raw["pyllm_model"]
    if not isinstance(fields, dict):
        raise ValueError(f"{cfg_path}: field 'pyllm_model' must be a JSON object of ModelConfig fields, "
                         f"not {json.dumps(fields)[:40]}")
    absent = {f.name for f in dataclasses.fields(ModelConfig)} - _OPTIONAL_FIELDS - set(fields) - set(overrides)
    if absent:
        raise ValueError(f"{cfg_path}: 'pyllm_model' lacks field(s) {sorted(absent)}, which save_model writes "
                         "(a default would silently give another model)")
    try:
        cfg = ModelConfig.from_dict({**fields, **overrides})
    except ValueError as e:
        raise ValueError(f"{cfg_path}: {e}") from None
    weights = directory / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{directory}: config.json but no model.safetensors")
    state = load_weights(weights)
    integer = next((name for name, t in state.items() if not t.is_floating_point()), None)
    if integer is not None:  # (load_state_dict would convert it into the float parameter without a word)
        raise ValueError(f"{weights}: tensor {integer!r} has dtype {state[integer].dtype}; model weights are "
                         "floating point")
    model = Transformer(cfg)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        detail = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))
        raise ValueError(f"{weights}: does not match config.json ({detail})") from None
    if unexpected or missing:
        raise ValueError(f"{weights}: does not match config.json "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return model.to(device=device, dtype=dtype)
