"""Perplexity and bits-per-byte of documents, scored with rolling windows over the model's context.

Every token of a document is scored exactly once. The first window starts with the eos prefix (so the
document's first token is predicted too) and scores up to ``max_len`` tokens; each later window scores
the next ``stride`` tokens and fills the rest of the model's context with the tokens just before them,
so a token is predicted from up to ``max_len - stride + 1`` tokens of context. ``stride = max_len``
(the default) gives lm-evaluation-harness's ``loglikelihood_rolling`` windows exactly (its
``context_len = 1``); a smaller stride buys more context per token at more compute.

Metrics, summed over all documents and then divided (as lm-eval aggregates them):
- ``bits_per_byte`` = -sum(log p) / ln 2 / bytes: the headline, independent of the tokenizer;
- ``byte_perplexity`` = exp(-sum(log p) / bytes), ``word_perplexity`` = exp(-sum(log p) / words)
  (words = whitespace-separated pieces, as lm-eval counts them);
- ``token_perplexity`` = exp(-sum(log p) / tokens), ``nll_per_token`` in nats.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator, Sequence

from tqdm import tqdm

from .loglik import Scorer, evaluating
from .parallel import all_reduce_sums, shard


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int,
                    stride: int | None = None) -> Iterator[tuple[list[int], int]]:
    """Windows (ids, n) for ``Scorer.score_windows``: run ``ids[:-1]``, score the last ``n`` of ``ids``.

    ``ids`` has at most ``max_len + 1`` entries (``max_len`` model inputs). The scored spans tile
    ``tokens`` exactly, in order, without overlap."""
    stride = max_len if stride is None else stride
    if not 1 <= stride <= max_len:
        raise ValueError(f"rolling_windows: stride={stride} must be in [1, max_len={max_len}]")
    full = [prefix, *tokens]  # full[i + 1] is tokens[i]
    first = min(max_len, len(tokens))
    if first:
        yield full[:first + 1], first
    done = first
    while done < len(tokens):
        n = min(stride, len(tokens) - done)
        end = done + n + 1  # one past the last scored id in `full`
        yield full[max(0, end - max_len - 1):end], n
        done += n


def _exp(x: float) -> float:
    """e^x, or inf past float range (a perplexity of an untrained or diverged model, not an error)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def perplexity(model, tokenizer, texts: Sequence[str], *, max_len: int | None = None, stride: int | None = None,
               batch_size: int = 16, rank: int = 0, world_size: int = 1, progress: bool = False) -> dict:
    """Perplexity metrics of ``texts`` (see the module docstring). With ``world_size > 1`` each rank
    scores every ``world_size``-th document and the sums are all-reduced (torch.distributed)."""
    if not texts:
        raise ValueError("perplexity: no texts given")
    scorer = Scorer(model, batch_size=batch_size, max_len=max_len)
    docs = shard(texts, rank, world_size)
    logprob = n_tokens = n_bytes = n_words = 0.0
    pending: list[tuple[list[int], int]] = []  # windows of several documents share batches

    scored = 0  # tokens scored so far, for the progress bar's rate

    def flush():
        nonlocal logprob, scored
        logprob += sum(s.logprob for s in scorer.score_windows(pending))
        scored += sum(n for _, n in pending)
        pending.clear()

    start = time.perf_counter()
    with evaluating(model), tqdm(total=len(docs), desc="perplexity", unit="doc", disable=not progress) as bar:
        for i, text in enumerate(docs):
            ids = tokenizer.encode(text)
            pending.extend(rolling_windows(ids, tokenizer.eos_id, scorer.max_len, stride))
            n_tokens += len(ids)
            n_bytes += len(text.encode("utf-8"))
            n_words += count_words(text)
            if len(pending) >= 8 * batch_size or i == len(docs) - 1:
                flush()
            bar.update()
            bar.set_postfix(tok_per_s=f"{scored / (time.perf_counter() - start):.0f}", refresh=False)
    logprob, n_tokens, n_bytes, n_words = all_reduce_sums([logprob, n_tokens, n_bytes, n_words], world_size)
    if n_tokens == 0 or n_bytes == 0:
        raise ValueError("perplexity: the texts are empty (no tokens to score)")
    nll = -logprob
    return {
        "bits_per_byte": nll / n_bytes / math.log(2),
        "byte_perplexity": _exp(nll / n_bytes),
        "word_perplexity": _exp(nll / n_words),
        "token_perplexity": _exp(nll / n_tokens),
        "nll_per_token": nll / n_tokens,
        "tokens": int(n_tokens),
        "bytes": int(n_bytes),
        "words": int(n_words),
        "documents": len(texts),
    }
