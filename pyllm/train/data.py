"""Batch sources for the trainer: text (file, folder or the built-in text) with a byte- or character-
level tokenizer. Token shards (the data stage's output) are read by pyllm.data.loader.ShardLoader.

A batch source has ``next_batch() -> {"input_ids": (B, T) int64, "targets": (B, T) int64}`` and
``state_dict()/load_state_dict()`` (the data position, for exact resume).

Sampling is nanoGPT's (a random window of T + 1 tokens per sequence) made resumable and layout-free:
the run's sequences are numbered globally, in the order micro-batch, rank, row, and the start of
sequence i comes from a generator seeded by (seed, i // CHUNK). So a run with 4 accumulation steps of
1 sequence sees the same sequences as one step of 4, and 2 ranks of 2 the same as 1 rank of 4.
The state is the number of sequences drawn by all ranks together, so a run can resume with another
micro-batch size or number of processes and still continue with the next sequence (``layout_free``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pyllm.data.loader import resume_step
from pyllm.tokenizer import ByteTokenizer, CharTokenizer, Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ""}
BUILTIN = "builtin"


class DataError(ValueError):
    """Bad training data (missing, empty, unreadable); the message names the file."""


def builtin_text() -> str:
    """English prose that ships with every Python: the interpreter's pydoc topics (~460K characters),
    in sorted topic order so every machine builds the same text."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))


def data_identity(spec: str) -> str:
    """What names the data of a run: the absolute path (``text.txt``, ``./text.txt`` and its full path are
    one file; ``text.txt`` from another directory is another), or "builtin" as it is."""
    return spec if spec == BUILTIN else str(Path(spec).resolve())


def read_documents(path: str) -> list[str]:
    """The documents of ``path``: one per text file (a folder is read recursively, sorted by path; hidden
    entries such as .git or .DS_Store are skipped, as the data stage skips them)."""
    if path == BUILTIN:
        return [builtin_text()]
    p = Path(path)
    if not p.exists():
        raise DataError(f"data path {path!r} does not exist")
    files = [p] if p.is_file() else sorted(
        f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in f.relative_to(p).parts))
    if not files:
        raise DataError(f"data folder {path!r} has no text files ({', '.join(sorted(TEXT_SUFFIXES - {''}))})")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"data file {str(f)!r} is not UTF-8 text (byte {e.start})") from None
        if text.strip():
            docs.append(text)
    if not docs:
        raise DataError(f"data {'file' if p.is_file() else 'folder'} {path!r} is empty")
    return docs


def build_tokenizer(kind: str, docs: list[str]) -> Tokenizer:
    return ByteTokenizer() if kind == "byte" else CharTokenizer.from_text("".join(docs))


def tokenize_documents(tokenizer: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one token stream, each document followed by the end-of-text id."""
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer.encode(d))
        ids.append(tokenizer.eos_id)
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
    return np.asarray(ids, dtype=dtype)


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Train = the head, validation = the tail ``val_fraction`` of the stream (nanoGPT's 90/10 split)."""
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) <= seq_len + 1:
            raise DataError(f"{source}: the {name} split has {len(part)} tokens, fewer than seq_len + 2 "
                            f"({seq_len + 2}); use more text, a smaller seq_len or another val_fraction")
    return train, val


class RandomWindows:
    """Random (T + 1)-token windows of a token array; see the module docstring for the sampling rule."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(tokens) <= seq_len + 1:
            raise DataError(f"{len(tokens)} tokens cannot fill one sequence of seq_len={seq_len}")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.position = 0  # micro-batches drawn so far
        self._arange = np.arange(seq_len + 1)
        self._chunk_id, self._chunk = -1, None

    CHUNK = 4096  # sequences whose starts are drawn together from one seeded generator

    def _starts(self, first: int, count: int) -> np.ndarray:
        """Start offsets of global sequences first .. first + count - 1."""
        out = []
        while count > 0:
            chunk, offset = divmod(first, self.CHUNK)
            if self._chunk_id != chunk:
                # mod 2**64: manual_seed takes a uint64 (seeds whose product fitted keep their streams)
                gen = torch.Generator().manual_seed((self.seed * 1_000_003 + chunk) % 2 ** 64)
                self._chunk = torch.randint(len(self.tokens) - self.seq_len - 1, (self.CHUNK,), generator=gen).numpy()
                self._chunk_id = chunk
            take = min(count, self.CHUNK - offset)
            out.append(self._chunk[offset:offset + take])
            first, count = first + take, count - take
        return np.concatenate(out)

    def windows(self, n: int) -> torch.Tensor:
        """This rank's windows of global micro-batch ``n``: (B, T + 1) int64."""
        first = (n * self.world_size + self.rank) * self.batch_size
        starts = self._starts(first, self.batch_size)
        return torch.from_numpy(self.tokens[starts[:, None] + self._arange].astype(np.int64))

    def next_batch(self) -> dict[str, torch.Tensor]:
        w = self.windows(self.position)
        self.position += 1
        return {"input_ids": w[:, :-1], "targets": w[:, 1:]}

    layout_free = True  # the state is the same on every rank and holds for any micro-batch and world size

    def state_dict(self) -> dict:
        return {"sequences": self.position * self.batch_size * self.world_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise DataError(f"the saved data position is for seed={state['seed']}, this run has seed={self.seed}; "
                            "resume with the same seed or start in another out_dir")
        if "sequences" not in state:  # written before the count was global: micro-batches of the same layout
            self.position = int(state["position"])
            return
        self.position = resume_step(state["sequences"], self.batch_size, self.world_size, error=DataError,
                                    saved=f"the saved data position ({state['sequences']} sequences drawn)",
                                    batches="this run's micro-batches", resize="micro_batch_size x world_size")


def fixed_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The same ``n_batches`` batches at every call (for evaluation: comparable numbers across steps)."""
    src = RandomWindows(tokens, seq_len, batch_size, seed + 7919, rank, world_size)
    return [src.next_batch() for _ in range(n_batches)]


# ----------------------------------------------------------------------------------------- shards


def is_shard_dir(path: str) -> bool:
    """A pyllm-shards-v1 directory (the data stage's output), read by pyllm.data.loader.ShardLoader."""
    return Path(path, "manifest.json").is_file()
