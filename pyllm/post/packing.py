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
    """Packed SFT rows and windows of pretraining text (replay) in a share of every optimiser step that
    does not depend on how the step is split into micro-batches and processes.

    Each step of ``batch_size`` rows the ranks together draw ``batch_size - n_replay`` packed rows (from
    ``packed``'s order) and ``n_replay`` windows (``text.take``: a pyllm.data.loader.ShardLoader's stream).
    The step's M = batch_size / micro micro-batches (micro-step a of rank r is number a x world_size + r;
    micro is ``packed.batch_size``) take the windows in order, floor((m + 1) n / M) - floor(m n / M) for
    micro-batch m, and the packed rows in order for the rest of their rows: any split of the step trains
    the same rows, and one process with no accumulation reads what it did when the share was counted per
    micro-batch. The state (both counts, between steps) is the same on every rank and resumes on another
    split (``layout_free``).

    ``next_batch()`` -> the keys of ``PackedBatches`` (micro, seq_len) with the replay rows last, laid out
    as in pretraining (positions 0..seq_len-1, the shards' document ids, every token a target);
    ``replay_rows``, how many; and ``part_weights`` (2,): M x this micro-batch's share of the step's trained
    packed tokens and of its replayed tokens (0 for a part it lacks). ``replay_loss`` weighs its two means
    by them, so the step's loss is (1 - mix) x the mean over every trained packed token of the step plus
    mix x the mean over its replayed tokens, however the step is split."""

    def __init__(self, packed: PackedBatches, text, n_replay: int, batch_size: int):
        # text: a pyllm.data.loader.ShardLoader of batch_size 1 on one rank (take(k) -> stream positions,
        # windows(positions) -> batch; its state then loads at any count)
        micro, world_size = packed.batch_size, packed.world_size
        if batch_size % (micro * world_size):
            raise ValueError(f"ReplayBatches: batch_size={batch_size} is not a whole number of micro-batches of "
                             f"{micro} rows on {world_size} rank(s)")
        if not 0 < n_replay < batch_size:
            raise ValueError(f"ReplayBatches: n_replay={n_replay} must leave rows of both kinds in a batch of "
                             f"{batch_size}")
        if text.seq_len != packed.rows["input_ids"].shape[1]:
            raise ValueError(f"ReplayBatches: text windows of {text.seq_len} tokens but packed rows of "
                             f"{packed.rows['input_ids'].shape[1]}; build both with the same seq_len")
        self.packed, self.text, self.n_replay, self.batch_size = packed, text, n_replay, batch_size
        self.micro_batches = batch_size // micro  # M, over all ranks
        self.layout_free = packed.layout_free and getattr(text, "layout_free", False)
        self._plan: list[tuple[list[int], range]] = []  # this rank's micro-batches left in the step
        self._per_micro = torch.ones(2, dtype=torch.float64)  # the step's (trained, replayed) tokens / M

    def _draw_step(self) -> None:
        """Draw the next step's rows (as every rank does) and keep this rank's micro-batches of it."""
        M, n, micro = self.micro_batches, self.n_replay, self.packed.batch_size
        ids, windows = self.packed.order.take(self.batch_size - n), self.text.take(n)
        cut_text = [m * n // M for m in range(M + 1)]  # micro-batch m: windows[cut_text[m]:cut_text[m + 1]]
        cut_ids = [m * micro - cut_text[m] for m in range(M + 1)]
        self._plan = [(ids[cut_ids[m]:cut_ids[m + 1]], windows[cut_text[m]:cut_text[m + 1]])
                      for m in range(self.packed.rank, M, self.packed.world_size)]
        trained = int((self.packed.rows["targets"][torch.tensor(ids)] != IGNORE).sum())
        self._per_micro = torch.tensor([max(trained, 1), n * self.text.seq_len], dtype=torch.float64) / M

    def next_batch(self) -> dict:
        if not self._plan:
            self._draw_step()
        ids, positions = self._plan.pop(0)
        parts, trained = [], 0
        if ids:
            rows = self.packed.collate(ids)
            trained = rows.pop("loss_weight")  # the mixed loss is weighed by part_weights instead
            parts.append(rows)
        if positions:
            text = self.text.windows(positions)
            parts.append({**text, "positions": torch.arange(self.text.seq_len).expand(len(positions), -1)})
        batch = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        counts = torch.tensor([trained, len(positions) * self.text.seq_len], dtype=torch.float64)
        return {**batch, "replay_rows": len(positions), "part_weights": (counts / self._per_micro).float()}

    def state_dict(self) -> dict:
        if self._plan:
            raise ValueError("ReplayBatches: the state is kept between optimiser steps, not within one")
        return {"packed": self.packed.state_dict(), "text": self.text.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Resume both counts; any split of the steps continues from them (the text position need not be a
        whole number of this split's steps: states of earlier versions counted per micro-batch)."""
        self.packed.load_state_dict(state["packed"])
        self.text.load_state_dict(state["text"])
        self._plan = []
