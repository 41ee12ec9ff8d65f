"""Train a byte-level BPE tokenizer (GPT-2 style) on the curated text with Hugging Face ``tokenizers``.

Byte-level: the 256 byte symbols are the initial alphabet, so any text encodes with no unknown token.
The result is a standard ``tokenizer.json`` (readable by ``tokenizers``/``transformers``) carrying
pyllm's special tokens (``pyllm.tokenizer.SPECIAL_TOKENS``: end of document and the chat roles), loaded
back with ``pyllm.tokenizer.HFTokenizer``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyllm.tokenizer import SPECIAL_TOKENS, HFTokenizer
from pyllm.typecheck import check_fields


@dataclass
class TokenizerConfig:
    vocab_size: int = 8192
    """Total vocabulary: 256 bytes + merges + special tokens, at most 2**24. <= 65,536 packs tokens as uint16."""
    min_frequency: int = 2
    """A pair must occur at least this often to be merged."""

    def __post_init__(self):
        check_fields(self, label="tokenizer")
        smallest = 256 + len(SPECIAL_TOKENS)
        # 2**24 (16.8M) is ~64x the largest vocabularies in use, keeps ids exact in float32, and its embedding
        # table is already ~25 GB at d_model 768 in bf16; beyond it the trainer's per-entry tables exhaust memory
        # (2e9 asked for 141 GB and aborted the process)
        if not smallest <= self.vocab_size <= 2**24:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size}: must be in [{smallest}, 2**24] "
                             f"(256 byte symbols + {len(SPECIAL_TOKENS)} special tokens at least)")
        if self.min_frequency < 1:
            raise ValueError(f"tokenizer.min_frequency={self.min_frequency}: must be >= 1")


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path) -> HFTokenizer:
    """Train on ``texts`` (streamed), save ``out_dir/tokenizer.json`` and return it as an HFTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    hf = HFTokenizer(tok)
    hf.save(out_dir)
    return hf
