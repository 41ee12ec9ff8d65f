"""ShardLoader: a streaming, deterministic, resumable batch source over a pyllm shard directory.

Each shard of the chosen split is cut into windows of ``seq_len + 1`` tokens at stride ``seq_len``
(inputs are the first ``seq_len``, targets the last ``seq_len``); windows never cross shards, so a shard's
last (tokens - 1) % seq_len tokens are not read (``unread_tokens``; a warning above 1% of the split). The windows
are read as one endless stream: epoch e is a permutation of all windows drawn from ``(seed, e)``, and
stream position g is window ``perm_{g // n}[g % n]`` of the n windows. Each step the ranks together read
the next ``batch_size`` x ``world_size`` positions, rank ``r`` every ``world_size``-th of them from the
r-th, so the windows read (and where an epoch ends) depend on the seed and the count alone, not on the
micro-batch size or number of ranks; rank r's k-th window is position r + k x world_size of a run that
never resumed. The state is that count (as the epoch and the windows read in it), so ``load_state_dict``
resumes at the exact next window, also with another batch size or number of ranks (``layout_free``).
Shards are memory-mapped: nothing is read before it is needed.

``doc_ids`` (B, T) numbers the documents inside each row (from the ``.idx`` offsets) so attention can
stay within a document (``Transformer(doc_ids=...)``).

The manifest and the files of the split are checked when the loader is made (fields, file sizes against
the token counts, the vocabulary against the model's), so a damaged directory is a one-line ValueError
naming the file, not a numpy or torch error when a bad shard is first read mid-run.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from .shards import read_manifest

UNREAD_WARN = 0.01  # the share of a split's tokens left unread in shard tails above which the loader warns


def resume_step(count: int, batch_size: int, world_size: int, *, saved: str, batches: str, resize: str,
                error: type[Exception] = ValueError) -> int:
    """The step at which a layout-free batch source resumes: ``count`` sequences drawn by all ranks together
    (its saved position) in steps of ``batch_size`` x ``world_size``. A count that is not a whole number of
    steps raises ``error``: "<saved> is not a whole number of <batches> of B x W rank(s); resume with a
    <resize> that divides it"."""
    per_step = batch_size * world_size
    if count % per_step:
        raise error(f"{saved} is not a whole number of {batches} of {batch_size} x {world_size} rank(s); "
                    f"resume with a {resize} that divides it")
    return count // per_step


def _read_checked_manifest(shard_dir: Path) -> dict:
    """read_manifest, with every field the loader reads checked: a bad one is named with the file."""
    path = shard_dir / "manifest.json"
    try:
        manifest = read_manifest(shard_dir)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except AttributeError:  # (read_manifest calls .get: a list or a number)
        raise ValueError(f"{path}: must hold a JSON object") from None
    if "dtype" not in manifest:
        raise ValueError(f"{path}: no 'dtype' field (the token type, e.g. 'uint16')")
    try:
        dtype = np.dtype(manifest["dtype"])
    except TypeError:
        dtype = None
    if dtype is None or dtype.kind != "u":
        raise ValueError(f"{path}: dtype={manifest['dtype']!r} is not an unsigned integer type")
    vocab = manifest.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{path}: vocab_size={vocab!r} must be a positive integer")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("tokens"), int)
            and e["tokens"] >= 0 for e in shards):
        raise ValueError(f"{path}: 'shards' must be a list of entries with a 'file' and a token count 'tokens'")
    return manifest


class ShardLoader:
    def __init__(self, shard_dir: str | Path, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, split: str = "train", vocab_size: int | None = None):
        """``vocab_size``: the model's vocabulary; shards whose token ids may reach it are refused."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"ShardLoader: seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardLoader: rank={rank} must be in [0, world_size={world_size})")
        if split not in ("train", "val"):
            raise ValueError(f"ShardLoader: split={split!r}; use 'train' or 'val'")
        self.dir = Path(shard_dir)
        self.manifest = _read_checked_manifest(self.dir)
        if vocab_size is not None and self.manifest["vocab_size"] > vocab_size:
            raise ValueError(f"{self.dir / 'manifest.json'}: the shards were made with a vocabulary of "
                             f"{self.manifest['vocab_size']}, the model's has {vocab_size}; use the tokenizer "
                             "the shards were made with")
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size, self.split = rank, world_size, split
        self.dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shards = [e for e in self.manifest["shards"] if e.get("split", "train") == split]
        for entry in self.shards:
            self._check_files(entry)
        windows = [max(0, (e["tokens"] - 1) // seq_len) for e in self.shards]
        self._first_window = np.concatenate([[0], np.cumsum(windows)]).astype(np.int64)
        self.num_windows = int(self._first_window[-1])
        # a shard's last (tokens - 1) % seq_len tokens (all of a shard shorter than a window) are never read
        total = sum(e["tokens"] for e in self.shards)
        self.unread_tokens = total - sum(w * seq_len + (w > 0) for w in windows)
        if self.unread_tokens > UNREAD_WARN * total:
            warnings.warn(f"{self.dir}: {self.unread_tokens:,} of the {total:,} tokens of split {split!r} "
                          f"({self.unread_tokens / total:.1%}) are in shard tails shorter than a window of "
                          f"{seq_len + 1} tokens and are never read (windows do not cross shards); write larger "
                          "shards (pyllm data --shard-tokens) or use a shorter seq_len", RuntimeWarning, stacklevel=2)
        # whole steps in an epoch (for progress); the stream runs on, so a step may straddle two epochs
        self.steps_per_epoch = self.num_windows // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.dir}: split {split!r} has {self.num_windows} window(s) of {seq_len + 1} "
                             f"tokens, fewer than batch_size * world_size = {batch_size * world_size}; "
                             "lower seq_len/batch_size or add data")
        self._tokens: dict[int, np.ndarray] = {}
        self._starts: dict[int, np.ndarray] = {}
        self.position = 0  # stream positions read by all ranks together
        self._permutations: dict[int, np.ndarray] = {}

    # -- data access ----------------------------------------------------------------------------------
    @staticmethod
    def _index_file(entry: dict) -> str:
        return entry.get("index_file", entry["file"].replace(".bin", ".idx"))

    def _check_files(self, entry: dict) -> None:
        """The shard and its index exist and the shard holds the manifest's token count (a truncated copy)."""
        tokens, index = self.dir / entry["file"], self.dir / self._index_file(entry)
        for f in (tokens, index):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: missing (listed in {self.dir / 'manifest.json'})")
        expected = entry["tokens"] * self.dtype.itemsize
        if tokens.stat().st_size != expected:
            raise ValueError(f"{tokens}: {tokens.stat().st_size} bytes, but manifest.json says {entry['tokens']} "
                             f"{self.dtype.name} tokens ({expected} bytes); the file is damaged or incomplete")
        if index.stat().st_size % 8:
            raise ValueError(f"{index}: {index.stat().st_size} bytes, not a whole number of 8-byte offsets")

    def _shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._tokens:
            entry = self.shards[i]
            self._tokens[i] = np.memmap(self.dir / entry["file"], dtype=self.dtype, mode="r")
            self._starts[i] = np.fromfile(self.dir / self._index_file(entry), dtype="<u8").astype(np.int64)
        return self._tokens[i], self._starts[i]

    @property
    def epoch(self) -> int:
        """The epoch of the next window to be read."""
        return self.position // self.num_windows

    def _permutation(self, epoch: int) -> np.ndarray:
        """The window ids of ``epoch`` in stream order (the last two epochs read are cached)."""
        if epoch not in self._permutations:
            if len(self._permutations) >= 2:
                del self._permutations[min(self._permutations)]
            self._permutations[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return self._permutations[epoch]

    def _rank_order(self) -> np.ndarray:
        """The window ids this rank reads in the current epoch, in order (the ranks' steps of batch_size x
        world_size positions keep rank r on the positions position + r + k x world_size)."""
        first = (self.position + self.rank - self.epoch * self.num_windows) % self.world_size
        return self._permutation(self.epoch)[first::self.world_size]

    def _window(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        """(seq_len + 1,) tokens of window ``w`` and the (seq_len,) document number of each input token."""
        shard = int(np.searchsorted(self._first_window, w, side="right") - 1)
        tokens, starts = self._shard(shard)
        offset = (w - int(self._first_window[shard])) * self.seq_len
        chunk = np.asarray(tokens[offset:offset + self.seq_len + 1], dtype=np.int64)
        doc = np.searchsorted(starts, np.arange(offset, offset + self.seq_len), side="right") - 1
        return chunk, doc - doc[0]

    # -- batch source protocol (pyllm.train.Trainer) ----------------------------------------------------
    def take(self, k: int) -> range:
        """The next ``k`` stream positions, drawn by all ranks together (every rank calls it alike, as
        ``next_batch`` does; a source that shares windows out itself, pyllm.post.packing.ReplayBatches,
        reads its share with ``windows``)."""
        start = self.position
        self.position += k
        return range(start, self.position)

    def windows(self, positions) -> dict[str, torch.Tensor]:
        """The windows at these stream positions, in that order: input_ids, targets, doc_ids (len, T)."""
        ids = [int(self._permutation(g // self.num_windows)[g % self.num_windows]) for g in positions]
        chunks, docs = zip(*(self._window(w) for w in ids))
        block = torch.from_numpy(np.stack(chunks))  # (B, T + 1)
        return {"input_ids": block[:, :-1].contiguous(), "targets": block[:, 1:].contiguous(),
                "doc_ids": torch.from_numpy(np.stack(docs))}

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.windows(self.take(self.batch_size * self.world_size)[self.rank::self.world_size])

    def __iter__(self):
        while True:
            yield self.next_batch()

    layout_free = True  # the state is the same on every rank and holds for any batch size and world size

    def state_dict(self) -> dict:
        epoch, windows = divmod(self.position, self.num_windows)
        return {"epoch": epoch, "windows": windows, "seed": self.seed, "split": self.split, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the state's stream position (windows read by all ranks together), which must be a whole
        number of this loader's steps. States of earlier versions, whose epochs ended at a whole number of
        steps, hold the same fields (the position is the window they read next) or, before the count was
        global, (step, batch_size, world_size)."""
        for key in ("seed", "split", "seq_len"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"ShardLoader state has {key}={state[key]!r} but this loader has "
                                 f"{getattr(self, key)!r}; resume with the same {key}")
        epoch = int(state["epoch"])
        windows = int(state.get("windows", int(state.get("step", 0)) * state.get("batch_size", self.batch_size)
                                * state.get("world_size", self.world_size)))
        position = epoch * self.num_windows + windows
        where = "in epoch 0" if epoch == 0 else f"({windows} of them in epoch {epoch})"
        resume_step(position, self.batch_size, self.world_size, batches="batches", resize="batch size x world size",
                    saved=f"ShardLoader state: {position} windows read {where}")
        self.position = position

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens trained in an epoch: every window's seq_len targets."""
        return self.num_windows * self.seq_len
