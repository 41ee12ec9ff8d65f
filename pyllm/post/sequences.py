"""Batches of (prompt, response) sequences: padding, per-token log-probs, and greedy evaluation.

Sequences are right-padded, so causal attention never lets a real token see padding and no document
ids are needed. ``train`` marks the response tokens (the ones a loss or a log-prob sum covers).
"""

from __future__ import annotations

import torch

from pyllm.model import Transformer
from pyllm.model.generate import generate

from .chat import ChatTemplate
from .datasets import Example, exact_match
from .losses import token_logprobs
from .packing import Encoded


def collate(items: list[Encoded], pad_id: int, device="cpu") -> dict[str, torch.Tensor]:
    """-> tokens (B, L) right-padded, train (B, L) float (response tokens), attention (B, L) float."""
    L = max(len(e.ids) for e in items)
    tokens = torch.full((len(items), L), pad_id, dtype=torch.long)
    train = torch.zeros(len(items), L)
    attention = torch.zeros(len(items), L)
    for i, e in enumerate(items):
        n = len(e.ids)
        tokens[i, :n] = torch.tensor(e.ids)
        train[i, :n] = torch.tensor(e.train, dtype=torch.float32)
        attention[i, :n] = 1.0
    return {"tokens": tokens.to(device), "train": train.to(device), "attention": attention.to(device)}


def response_logprobs(model: Transformer, tokens: torch.Tensor, train: torch.Tensor, temperature: float = 1.0):
    """Log-probs of each token given the ones before it, on response positions, under
    softmax(logits / temperature): the distribution the tokens were sampled from (RL ratios need the
    same one). -> (logp (B, L-1), mask (B, L-1)) aligned with tokens[:, 1:]."""
    logits = model(tokens[:, :-1])  # (B, L-1, V)
    if temperature != 1.0:
        logits = logits.float() / temperature
    return token_logprobs(logits, tokens[:, 1:]), train[:, 1:]


def sequence_logprob(logp: torch.Tensor, mask: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """Sum (or per-token mean) of response log-probs per sequence: (B, L) -> (B,)."""
    total = (logp * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if length_normalize else total


def generate_responses(model: Transformer, template: ChatTemplate, prompts: list[str], *, max_new_tokens: int,
                       temperature: float = 0.0, seed: int | None = None, batch_size: int = 64,
                       batch_rows: tuple[int, list[int]] | None = None):
    """Chat-formatted generation. -> (prompt ids, response ids incl. the end token, response texts,
    response log-probs per token). ``batch_rows``: see ``generate`` (the prompts must fit one batch)."""
    if batch_rows is not None and len(prompts) > batch_size:
        raise ValueError(f"generate_responses: batch_rows needs one batch, got {len(prompts)} prompts > "
                         f"batch_size={batch_size}")
    tok = template.tokenizer
    stops = template.end_ids()
    p_ids, r_ids, texts, lps = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        chunk = [template.prompt_ids([{"role": "user", "content": p}]) for p in prompts[start:start + batch_size]]
        out, logprobs = generate(model, chunk, max_new_tokens, temperature=temperature, stop_tokens=stops,
                                 seed=None if seed is None else seed + start, return_logprobs=True,
                                 batch_rows=batch_rows)
        for prompt, resp, lp in zip(chunk, out, logprobs):
            p_ids.append(prompt)
            r_ids.append(resp)
            texts.append(tok.decode([t for t in resp if t not in stops]))
            lps.append(lp)
    return p_ids, r_ids, texts, lps


@torch.no_grad()
def exact_matches(model: Transformer, template: ChatTemplate, examples: list[Example], max_new_tokens: int = 8,
                  batch_size: int = 64) -> int:
    """How many of ``examples`` get a greedy response equal to the right answer (``Example.reference``)."""
    _, _, texts, _ = generate_responses(model, template, [e.prompt for e in examples],
                                        max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    return sum(exact_match(t, e.reference) for t, e in zip(texts, examples))


@torch.no_grad()
def completion_nll(model: Transformer, encoded: list[Encoded], pad_id: int, batch_size: int = 64):
    """(summed negative log-likelihood, count) of the trained (completion) tokens of ``encoded``."""
    device = model.head_weight.device
    total, count = 0.0, 0.0
    for start in range(0, len(encoded), batch_size):
        b = collate(encoded[start:start + batch_size], pad_id, device)
        logp, mask = response_logprobs(model, b["tokens"], b["train"])
        total += float(-(logp * mask).sum())
        count += float(mask.sum())
    return total, count
