"""Packing: tokenize documents in parallel and write fixed-size token shards with an index and a manifest.

Layout of a shard directory (format ``pyllm-shards-v1``, see docs in contracts)::

    manifest.json          format, dtype, vocab_size, eos_id, tokenizer, shards[], totals, config
    tokenizer.json         the tokenizer that produced the ids (+ pyllm_tokenizer.json)
    shard_00000.bin        flat little-endian uint16/uint32 tokens; every document is followed by eos_id
    shard_00000.idx        uint64 start offset of each document in the .bin
    val_00000.bin/.idx     the held-out split, same format

A shard closes before a document would take it past ``shard_tokens`` (a longer document gets a shard of
its own), so shard boundaries depend only on the token counts of the documents in order. Documents go
to the validation split by a hash of their id, so the split is stable when the corpus grows.

Determinism: workers tokenize batches but results are consumed in input order, and everything written
is a function of the documents and the config, never of the worker count or timing.

Resume: after each shard, ``progress.json`` records the shards written (with checksums) and, per split,
the first document not yet in a closed shard. A rerun with the same config verifies those shards and
feeds the writers only the documents after them, so finished shards are neither re-tokenized nor
rewritten; the manifest is written last, so its presence means the stage is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pyllm.typecheck import check_fields

from .parallel import ordered_map

FORMAT = "pyllm-shards-v1"
SPLIT_PREFIX = {"train": "shard", "val": "val"}


@dataclass
class ShardConfig:
    shard_tokens: int = 1 << 19
    """Maximum tokens per shard (a single longer document gets its own shard)."""
    dtype: str = "auto"
    """"uint16", "uint32" or "auto" (uint16 when the vocabulary fits in 65,536 ids)."""
    val_fraction: float = 0.02
    """Fraction of documents (chosen by a hash of their id) written to the validation split."""
    batch_documents: int = 32
    """Documents per tokenization task sent to a worker."""

    def __post_init__(self):
        check_fields(self, label="shards")
        if self.shard_tokens < 1:
            raise ValueError(f"shards.shard_tokens={self.shard_tokens}: must be >= 1")
        if self.dtype not in ("auto", "uint16", "uint32"):
            raise ValueError(f"shards.dtype={self.dtype!r}: use 'auto', 'uint16' or 'uint32'")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"shards.val_fraction={self.val_fraction}: must be in [0, 1)")
        if self.batch_documents < 1:
            raise ValueError(f"shards.batch_documents={self.batch_documents}: must be >= 1")


def split_of(doc_id: str, val_fraction: float) -> str:
    """'val' for a stable ``val_fraction`` of document ids, else 'train'."""
    h = int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")
    return "val" if h < val_fraction * 2**64 else "train"


def token_dtype(cfg: ShardConfig, vocab_size: int) -> np.dtype:
    if cfg.dtype == "uint16" and vocab_size > 2**16:
        raise ValueError(f"shards.dtype='uint16' cannot hold a vocabulary of {vocab_size}; use 'uint32' or 'auto'")
    name = cfg.dtype if cfg.dtype != "auto" else ("uint16" if vocab_size <= 2**16 else "uint32")
    return np.dtype(name).newbyteorder("<")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a kill mid-write leaves the old file (and a stray ``.tmp``)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---- parallel tokenization -------------------------------------------------------------------------

_WORKER_TOKENIZER = None


def _init_worker(tokenizer_file: str) -> None:
    global _WORKER_TOKENIZER
    from pyllm.tokenizer import HFTokenizer

    # through HFTokenizer: it sets encode_special_tokens, which tokenizer.json does not store
    _WORKER_TOKENIZER = HFTokenizer.from_file(tokenizer_file).tok


def _tokenize_batch(batch: tuple[list[int], list[str], list[str]]):
    """(doc indices, splits, token ids per document) of one batch; the texts are not sent back."""
    indices, splits, texts = batch
    # special-token strings inside documents are plain text, never control tokens (see _init_worker)
    encodings = _WORKER_TOKENIZER.encode_batch(texts, add_special_tokens=False)
    return indices, splits, [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


# ---- writing ---------------------------------------------------------------------------------------

class _SplitWriter:
    """Accumulates one split's documents and writes a shard whenever the next one would not fit."""

    def __init__(self, split: str, out_dir: Path, cfg: ShardConfig, dtype: np.dtype, eos_id: int,
                 next_index: int, open_from: int, on_close):
        self.split, self.out_dir, self.cfg, self.dtype, self.eos = split, out_dir, cfg, dtype, eos_id
        self.index, self.open_from, self.on_close = next_index, open_from, on_close
        self.docs: list[np.ndarray] = []
        self.tokens = 0

    def add(self, doc_index: int, ids: np.ndarray) -> None:
        n = len(ids) + 1  # + eos
        if self.docs and self.tokens + n > self.cfg.shard_tokens:
            self.flush(doc_index)
        self.docs.append(ids)
        self.tokens += n

    def flush(self, next_doc: int) -> None:
        """Write the open shard; ``next_doc`` is the first document index not in it."""
        if not self.docs:
            return
        lengths = np.array([len(d) + 1 for d in self.docs], dtype=np.uint64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype("<u8")
        flat = np.empty(int(lengths.sum()), dtype=self.dtype)
        ends = np.cumsum(lengths).astype(np.int64)
        for d, s, e in zip(self.docs, starts.astype(np.int64), ends):
            flat[s:e - 1] = d
            flat[e - 1] = self.eos
        name = f"{SPLIT_PREFIX[self.split]}_{self.index:05d}"
        write_atomic(self.out_dir / f"{name}.idx", starts.tobytes())
        write_atomic(self.out_dir / f"{name}.bin", flat.tobytes())
        entry = {"file": f"{name}.bin", "index_file": f"{name}.idx", "split": self.split,
                 "tokens": int(flat.size), "documents": len(self.docs),
                 "sha256": _sha256(self.out_dir / f"{name}.bin"),
                 "first_document": self.open_from, "end_document": next_doc}
        self.index += 1
        self.open_from = next_doc
        self.docs, self.tokens = [], 0
        self.on_close(self.split, entry)


class _Progress:
    """progress.json: the shards closed so far and where each split's open shard starts."""

    def __init__(self, out_dir: Path, config_key: str):
        self.path = out_dir / "progress.json"
        self.config_key = config_key
        self.shards: list[dict] = []
        self.open_from = {"train": 0, "val": 0}

    def load_verified(self) -> int:
        """Adopt a previous run's progress if its config matches and its shards are intact; returns the
        number of shards adopted (0 = start afresh)."""
        if not self.path.exists():
            return 0
        state = json.loads(self.path.read_text())
        if state.get("config_key") != self.config_key:
            return 0
        out_dir = self.path.parent
        for entry in state["shards"]:
            f = out_dir / entry["file"]
            if not f.exists() or _sha256(f) != entry["sha256"]:
                return 0
        self.shards, self.open_from = state["shards"], state["open_from"]
        return len(self.shards)

    def record(self, split: str, entry: dict) -> None:
        self.shards.append(entry)
        self.open_from[split] = entry["end_document"]
        write_atomic(self.path, json.dumps({"config_key": self.config_key, "shards": self.shards,
                                             "open_from": self.open_from}, indent=1).encode())


def pack_shards(documents: Iterable[tuple[str, str]], tokenizer_dir: Path, out_dir: Path, cfg: ShardConfig,
                config: dict, *, workers: int = 1, engine: str = "local", ray_address: str | None = None,
                progress_bar=None) -> tuple[dict, dict]:
    """Tokenize ``documents`` ((id, text) in a fixed order) into shards under ``out_dir``.

    ``config`` (everything that determines the output, never the worker count) is stored in the
    manifest and keys resumption. Returns (manifest, {"reused", "resumed_shards", "skipped_documents"}):
    ``reused`` when a finished directory made with the same config and tokenizer was kept as it was.
    ``progress_bar`` (tqdm) is advanced by tokens written.
    """
    from pyllm.tokenizer import load_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.save(out_dir)  # the shards carry the tokenizer that produced them
    tokenizer_file = out_dir / "tokenizer.json"
    dtype = token_dtype(cfg, tokenizer.vocab_size)
    config_key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()
                                + _sha256(tokenizer_file).encode()).hexdigest()
    done = _verified_manifest(out_dir, config, tokenizer_file)
    if done is not None:
        return done, {"reused": True, "resumed_shards": len(done["shards"]), "skipped_documents": None}
    (out_dir / "manifest.json").unlink(missing_ok=True)

    progress = _Progress(out_dir, config_key)
    resumed = progress.load_verified()
    if not resumed:
        for stale in list(out_dir.glob("shard_*")) + list(out_dir.glob("val_*")):
            stale.unlink()
    next_index = {s: sum(e["split"] == s for e in progress.shards) for s in SPLIT_PREFIX}
    writers = {s: _SplitWriter(s, out_dir, cfg, dtype, tokenizer.eos_id, next_index[s],
                               progress.open_from[s], progress.record) for s in SPLIT_PREFIX}
    counts = {"documents": 0, "skipped": 0}

    def pending() -> Iterator[tuple[list[int], list[str], list[str]]]:
        """Batches of (doc indices, splits, texts) still to tokenize; documents already in closed shards
        are skipped without being tokenized."""
        batch: tuple[list, list, list] = ([], [], [])
        for index, (doc_id, text) in enumerate(documents):
            counts["documents"] = index + 1
            split = split_of(doc_id, cfg.val_fraction)
            if index < writers[split].open_from:
                counts["skipped"] += 1
                continue
            for part, value in zip(batch, (index, split, text)):
                part.append(value)
            if len(batch[0]) == cfg.batch_documents:
                yield batch
                batch = ([], [], [])
        if batch[0]:
            yield batch

    for indices, splits, ids_batch in ordered_map(_tokenize_batch, pending(), workers=workers, engine=engine,
                                                  initializer=_init_worker, initargs=(str(tokenizer_file),),
                                                  ray_address=ray_address):
        for index, split, ids in zip(indices, splits, ids_batch):
            writers[split].add(index, ids)
            if progress_bar is not None:
                progress_bar.update(len(ids) + 1)
    for w in writers.values():
        w.flush(counts["documents"])

    shards = sorted(progress.shards, key=lambda e: (e["split"] != "train", e["file"]))
    manifest = {
        "format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "tokenizer": "tokenizer.json", "tokenizer_sha256": _sha256(tokenizer_file), "shards": shards,
        "totals": {s: {"shards": sum(e["split"] == s for e in shards),
                       "tokens": sum(e["tokens"] for e in shards if e["split"] == s),
                       "documents": sum(e["documents"] for e in shards if e["split"] == s)} for s in SPLIT_PREFIX},
        "config": config,
    }
    write_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=1).encode())
    progress.path.unlink(missing_ok=True)
    return manifest, {"reused": False, "resumed_shards": resumed, "skipped_documents": counts["skipped"]}


def _verified_manifest(out_dir: Path, config: dict, tokenizer_file: Path) -> dict | None:
    """The existing manifest if it was made with this config and tokenizer and every shard is intact."""
    path = out_dir / "manifest.json"
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("config") != json.loads(json.dumps(config)) or \
            manifest.get("tokenizer_sha256") != _sha256(tokenizer_file):
        return None
    for entry in manifest["shards"]:
        f = out_dir / entry["file"]
        if not f.exists() or _sha256(f) != entry["sha256"]:
            return None
    return manifest


def read_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{shard_dir}: no manifest.json (not a finished pyllm shard directory)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")
    return manifest
