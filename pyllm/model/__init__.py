"""pyllm.model: the decoder-only transformer (GPT-2 and Llama families), built only from pyllm.ops."""

from .config import PRESETS, ModelConfig, preset
from .io import load_model, save_model
from .transformer import KVCache, Transformer

__all__ = ["ModelConfig", "Transformer", "KVCache", "preset", "PRESETS", "save_model", "load_model"]
