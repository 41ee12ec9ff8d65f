"""Widths of the real models the GPU sweeps are taken from, and the token counts of each suite.

GPT-2 124M/350M (Radford et al. 2019) and Llama-3 1B/8B widths, as in ``pyllm.model`` presets.
"""

from __future__ import annotations

from pyllm.model import preset

MODELS = {
    "gpt2-124M": preset("gpt2_small"),
    "gpt2-350M": preset("gpt2_medium"),
    "llama-1B": preset("llama_1b"),
    "llama-8B": preset("llama_8b"),
}

# tokens per batch (B * T): 8 sequences of 1024 on GPU; small enough for a 2-core CPU otherwise
TOKENS = {"short": 64, "cpu": 1024, "gpu": 8192}
