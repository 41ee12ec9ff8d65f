"""Encoding chat examples and packing many of them into each training sequence.

A packed row holds several examples back to back. ``doc_ids`` gives each example its own id so attention
never crosses from one into another, ``positions`` restart at 0 for each example, and the last token of
an example predicts nothing: the logits of a packed example equal those of the example alone.

``ReplayBatches`` adds windows of pretraining text to every batch of packed rows (replay: keeps SFT from
forgetting the pretraining distribution).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .chat import ChatTemplate
from .datasets import Conversation, DataError

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """One example as tokens: ``ids`` (n,) and ``train`` (n,) True where the token is trained."""

    ids: tuple[int, ...]
    train: tuple[bool, ...]
    origin: str = ""


def _where(origin: str) -> tuple[str, int | None]:
    path, _, line = origin.rpartition(":")
    return (path, int(line)) if line.isdigit() else (origin, None)


def encode_examples(template: ChatTemplate, items, max_len: int) -> list[Encoded]:
    """Examples / Conversations -> Encoded; a bad message, no assistant turn or an example longer than
    ``max_len`` tokens is a DataError naming its file and line."""
    out = []
    for it in items:
        try:
            if isinstance(it, Conversation):
                ids, train = template.encode(list(it.messages))
            else:
                ids, train = template.encode_prompt_completion(it.prompt, it.completion)
        except ValueError as e:
            raise DataError(*_where(it.origin), str(e)) from None
        if len(ids) > max_len:
            raise DataError(*_where(it.origin), f"example is {len(ids)} tokens, longer than the context "
                            f"({max_len}); shorten it or raise seq_len")
        out.append(Encoded(tuple(ids), tuple(train), it.origin))
    return out


def example_tensors(ex: Encoded) -> dict[str, torch.Tensor]:
    """One unpacked example as a (1, n) batch: input_ids, targets (-100 where not trained), positions."""
    ids = torch.tensor(ex.ids)
    train = torch.tensor(ex.train)
    targets = torch.where(train[1:], ids[1:], torch.full_like(ids[1:], IGNORE))
    targets = torch.cat([targets, torch.tensor([IGNORE])])  # the last token predicts nothing
    return {"input_ids": ids[None], "targets": targets[None], "positions": torch.arange(len(ids))[None]}


def pack(examples: list[Encoded], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Greedy first-fit packing in order -> tensors (R, seq_len): input_ids, targets, doc_ids, positions.
    Padding has target -100 and a doc id of its own."""
    rows: list[list[Encoded]] = []
    space: list[int] = []
    for ex in examples:
        n = len(ex.ids)
        for r, free in enumerate(space):
            if free >= n:
                rows[r].append(ex)
                space[r] -= n
                break
        else:
            rows.append([ex])
            space.append(seq_len - n)
    R = len(rows)
    input_ids = torch.full((R, seq_len), pad_id, dtype=torch.long)
    targets = torch.full((R, seq_len), IGNORE, dtype=torch.long)
    doc_ids = torch.zeros((R, seq_len), dtype=torch.long)
    positions = torch.zeros((R, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for d, ex in enumerate(row):
            t = example_tensors(ex)
            n = len(ex.ids)
            input_ids[r, start:start + n] = t["input_ids"][0]
            targets[r, start:start + n] = t["targets"][0]
            doc_ids[r, start:start + n] = d
            positions[r, start:start + n] = t["positions"][0]
            start += n
        doc_ids[r, start:] = len(row)  # padding: a document of its own
    return {"input_ids": input_ids, "targets": targets, "doc_ids": doc_ids, "positions": positions}


class ShuffledOrder:
    """Item ids 0..n-1 as one endless stream, in a new seeded permutation every epoch (``salt`` keeps two
    sources with the same seed apart). ``take(k)`` returns the next k ids. Its state (epoch, index into the
    epoch's permutation) counts the ids drawn by all data-parallel ranks together, so it is the same on
    every rank and holds for any batch size and number of ranks."""

    def __init__(self, n: int, seed: int, salt: int):
        self.n, self.seed, self.salt = n, seed, salt
        self.epoch, self.index = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * self.salt + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.index >= self.n:
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(self._order[self.index])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self._order = self._permutation()


class RankBatches:
    """A batch source over ``ShuffledOrder``: each step the ranks together draw ``batch_size`` x
    ``world_size`` ids and rank r keeps the r-th ``batch_size`` of them (one rank: the next batch_size).
    Subclasses turn ids into tensors (``collate``)."""

    layout_free = True  # resumable with another batch size or number of ranks (see ShuffledOrder)

    def __init__(self, n: int, batch_size: int, seed: int, salt: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"{type(self).__name__}: rank={rank} must be in [0, world_size={world_size})")
        self.order = ShuffledOrder(n, seed, salt)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def next_ids(self) -> list[int]:
        ids = self.order.take(self.batch_size * self.world_size)
        return ids[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate(self.next_ids())

    def collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return self.order.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)


class PackedBatches(RankBatches):
    """Batch source for the Trainer over packed rows: shuffled each epoch (seeded), resumable, split over
    data-parallel ranks.

    ``next_batch()`` -> {"input_ids", "targets", "doc_ids", "positions"} each (batch_size, seq_len), and
    ``loss_weight``: the number of trained targets, over which the SFT loss is a mean (the Trainer then
    averages over every trained token of a step, however it is split into micro-batches and ranks)."""

    def __init__(self, rows: dict[str, torch.Tensor], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.rows = rows
        super().__init__(rows["input_ids"].shape[0], batch_size, seed, 100003, rank, world_size)

    def collate(self, ids: list[int]) -> dict[str, torch.Tensor]:
        idx = torch.tensor(ids)
        batch = {k: v[idx] for k, v in self.rows.items()}
        return {**batch, "loss_weight": int((batch["targets"] != IGNORE).sum())}


class ReplayBatches:
    """Packed SFT rows plus ``n_replay`` windows of pretraining text in every batch, both resumable.

    ``next_batch()`` -> the keys of ``PackedBatches`` (batch_size + n_replay, seq_len) with the replay
    rows last, laid out as in pretraining (positions 0..seq_len-1, the shards' document ids, every token
    a target), and ``replay`` (batch_size + n_replay,) bool, True on those rows."""

    def __init__(self, packed: PackedBatches, text):
        # text: a pyllm.data.loader.ShardLoader (next_batch -> input_ids, targets, doc_ids (n_replay, T))
        self.packed, self.text = packed, text
        self.layout_free = packed.layout_free and getattr(text, "layout_free", False)
        self.replay = torch.tensor([False] * packed.batch_size + [True] * text.batch_size)
        self.positions = torch.arange(text.seq_len).expand(text.batch_size, -1)

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows, text = self.packed.next_batch(), self.text.next_batch()
        del rows["loss_weight"]  # the mixed loss is a sum of two means (below): the micro-batches weigh alike
        if text["input_ids"].shape[1] != rows["input_ids"].shape[1]:
            raise ValueError(f"ReplayBatches: text windows of {text['input_ids'].shape[1]} tokens but packed rows "
                             f"of {rows['input_ids'].shape[1]}; build both with the same seq_len")
        text = {**text, "positions": self.positions}
        return {**{k: torch.cat([rows[k], text[k]]) for k in rows}, "replay": self.replay}

    def state_dict(self) -> dict:
        return {"packed": self.packed.state_dict(), "text": self.text.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.packed.load_state_dict(state["packed"])
        self.text.load_state_dict(state["text"])
