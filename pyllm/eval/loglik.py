"""Log-likelihood scoring of token sequences under a pyllm ``Transformer``: the one primitive that
perplexity, multiple choice and the lm-evaluation-harness adapter are all built on.

Conventions follow lm-evaluation-harness so the numbers compare with published ones:
- a pair (context, continuation) is tokenised as ``encode(context + continuation)`` split after
  ``len(encode(context))`` tokens, with trailing whitespace of the context moved to the continuation;
- the context always starts with the end-of-document token (pyllm packs documents as ``doc <eos>
  doc <eos>``, so eos is what a model has seen before the start of a document; lm-eval uses the same
  token as its prefix for empty contexts and rolling windows);
- inputs longer than the model's context are truncated on the left, keeping the continuation.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pyllm.model import KVCache, Transformer


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """Eval mode (no dropout) for the duration, then the model's previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids with the eos prefix, continuation ids), split the way lm-eval splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    return [tokenizer.eos_id, *ctx], whole[len(ctx):]


@dataclass
class Score:
    """Summed log-probability (nats) of a continuation and whether greedy decoding would produce it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


class Scorer:
    """Scores continuations with one model. ``batch_size`` sequences run per forward pass; sequences
    are right-padded (causal attention: padding after a token never changes that token's logits)."""

    def __init__(self, model: Transformer, batch_size: int = 16, max_len: int | None = None):
        if batch_size < 1:
            raise ValueError(f"Scorer: batch_size={batch_size} must be >= 1")
        self.model = model
        self.batch_size = batch_size
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def _head_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """log-softmax of the output head on hidden rows h (..., d) in fp32 -> (..., V), autocast or not."""
        with torch.autocast(self.device.type, enabled=False):
            return F.log_softmax(h.float() @ self.model.head_weight.float().t(), dim=-1)

    @torch.no_grad()
    def score_windows(self, windows: Sequence[tuple[list[int], int]]) -> list[Score]:
        """Each window is (input ids, n): the input's next-token predictions score its last ``n``
        targets, where targets are the inputs shifted by one and the final target is the last id.

        Concretely a window ``ids`` of length L is run as ``ids[:-1]`` and scores ``ids[L-n:]``.
        """
        out: list[Score | None] = [None] * len(windows)
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # similar lengths together
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            lengths = [len(windows[i][0]) - 1 for i in chunk]
            T = max(lengths)
            if T > self.max_len:
                raise ValueError(f"window of {T} inputs exceeds max_len={self.max_len}")
            idx = torch.zeros(len(chunk), T, dtype=torch.long)
            for row, i in enumerate(chunk):
                idx[row, :lengths[row]] = torch.tensor(windows[i][0][:-1])
            h = self.model.hidden(idx.to(self.device))  # (B, T, d)
            # row by row, so the fp32 log-probs are (n, V) at a time, never (B, T, V)
            logps, targets = [], []
            for row, i in enumerate(chunk):
                ids, n = windows[i]
                logps.append(self._head_logprobs(h[row, lengths[row] - n:lengths[row]]))  # (n, V)
                targets.append(ids[-n:])
            for i, score in zip(chunk, self._scores(logps, targets)):
                out[i] = score
        return out

    def _scores(self, logps: Sequence[torch.Tensor], targets: Sequence[list[int]]) -> list[Score]:
        """Score of each target sequence (n,) under its log-probs (n, V); one host sync for all."""
        sums, greedy = [], []
        for logp, target in zip(logps, targets):
            t = torch.tensor(target, device=self.device)
            sums.append(logp.gather(-1, t[:, None]).double().sum())
            greedy.append((logp.argmax(-1) == t).all())
        sums, greedy = torch.stack(sums).tolist(), torch.stack(greedy).tolist()
        return [Score(s, g, len(t)) for s, g, t in zip(sums, greedy, targets)]

    def loglikelihood(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """Score each (context ids, continuation ids); the context is left-truncated to fit. A continuation
        longer than the context window is scored on its last max_len tokens only (as lm-evaluation-harness
        does), with a warning: its score is not comparable with the others'."""
        windows, cut = [], 0
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("loglikelihood: empty continuation (nothing to score)")
            if not ctx:
                raise ValueError("loglikelihood: empty context; start it with the eos prefix (encode_pair)")
            ids = (ctx + cont)[-(self.max_len + 1):]
            windows.append((ids, min(len(cont), len(ids) - 1)))
            cut += len(cont) > len(ids) - 1
        if cut:
            warnings.warn(f"loglikelihood: {cut} continuation(s) longer than the {self.max_len}-token context were "
                          "scored on their last tokens only", RuntimeWarning, stacklevel=2)
        return self.score_windows(windows)

    @torch.no_grad()
    def choices(self, ctx: list[int], conts: Sequence[list[int]]) -> list[Score]:
        """Score several continuations of ONE context, running the context once: its keys and
        values go into a KV cache that is then repeated for a batch of all continuations.

        Falls back to independent scoring when context + longest continuation exceed max_len (then
        each continuation gets its own left truncation, as in ``loglikelihood``)."""
        if not conts or any(len(c) == 0 for c in conts):
            raise ValueError("choices: every continuation needs at least one token")
        longest = max(len(c) for c in conts)
        if len(ctx) + longest - 1 > self.max_len or len(conts) > self.batch_size:
            return self.loglikelihood([(ctx, c) for c in conts])
        cfg, n = self.model.cfg, len(conts)
        cache = KVCache.empty(cfg, 1, len(ctx) + longest - 1, self.device, self.dtype)
        h_ctx = self.model.hidden(torch.tensor([ctx], device=self.device), cache=cache)  # (1, Tc, d)
        first = self._head_logprobs(h_ctx[0, -1]).expand(n, -1)[:, None]  # (n, 1, V): predicts cont[0]
        if longest > 1:
            shared = KVCache(cache.k.repeat(1, n, 1, 1, 1), cache.v.repeat(1, n, 1, 1, 1), cache.length)
            idx = torch.zeros(n, longest - 1, dtype=torch.long)
            for row, c in enumerate(conts):
                idx[row, :len(c) - 1] = torch.tensor(c[:-1])
            h = self.model.hidden(idx.to(self.device), cache=shared)  # (n, longest - 1, d)
            logp = torch.cat([first, self._head_logprobs(h)], dim=1)  # (n, longest, V)
        else:
            logp = first
        return self._scores([logp[row, :len(c)] for row, c in enumerate(conts)], conts)
