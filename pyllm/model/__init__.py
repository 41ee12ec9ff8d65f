"""pyllm.model: the decoder-only transformer (GPT-2 and Llama families), built only from pyllm.ops."""

from .config import PRESETS, ModelConfig, preset
from .generate import generate, sample_tokens
from .hf import load_hf, save_hf
from .io import load_model, save_model
from .transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache", "preset", "PRESETS", "save_model", "load_model",
           "generate", "sample_tokens", "load_hf", "save_hf"]
