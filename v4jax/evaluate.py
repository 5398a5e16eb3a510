"""Batch evaluation: per-token log-likelihoods, lm-eval-style requests and perplexity.

All scoring is one full forward per padded batch (right padding is harmless: the
model is causal). Requests are sorted by length and cut into batches whose padded
length is rounded up to a bucket, so a data set compiles a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.errors import DataError
from v4jax.sharding import fetch
from v4jax.tokens import bucket, check_token_ids, token_logprobs


@nnx.jit
def _score(model, ids):
    """ids: [batch, T] -> log p(ids[:, t+1] | ids[:, :t+1]) and greedy hits, both [batch, T-1]."""
    return token_logprobs(model(ids)[:, :-1], ids[:, 1:])


@dataclasses.dataclass(frozen=True)
class Score:
    loglikelihood: float  # sum of log p over the scored tokens
    is_greedy: bool  # every scored token is the argmax
    n_tokens: int


def score_spans(model, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                batch_size: int = 8, pad_id: int = 0) -> list[Score]:
    """Log-likelihood of tokens seq[a:b] given seq[:a], for each (seq, (a, b)) with a >= 1."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (seq, (a, b)) in enumerate(zip(sequences, spans, strict=True)):
        if not 1 <= a <= b <= len(seq):
            raise DataError(f"request {i}: span {(a, b)} is not inside a sequence of {len(seq)} tokens")
        check_token_ids(seq, model.cfg.vocab_size, f"request {i}")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[Score | None] = [None] * len(sequences)
    for first in range(0, len(order), batch_size):
        chunk = order[first:first + batch_size]
        width = bucket(max(len(sequences[i]) for i in chunk))
        ids = np.full((batch_size, width), pad_id, np.int32)
        for row, i in enumerate(chunk):
            ids[row, :len(sequences[i])] = sequences[i]
        logp, greedy = (fetch(a) for a in _score(model, jnp.asarray(ids)))
        for row, i in enumerate(chunk):
            a, b = spans[i]
            # logp[:, t] scores token t + 1
            out[i] = Score(float(logp[row, a - 1:b - 1].sum()), bool(greedy[row, a - 1:b - 1].all()), b - a)
    return out


def loglikelihood(model, requests: Iterable[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                  max_len: int | None = None) -> list[Score]:
    """lm-eval `loglikelihood`: for each (context, continuation) token lists, log p(continuation | context).
    `max_len` (e.g. the checkpoint's max_position_embeddings) bounds each request's total length."""
    requests = list(requests)
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise DataError(f"request {i}: context and continuation must both be non-empty token lists")
        if max_len is not None and len(context) + len(continuation) > max_len:
            raise DataError(f"request {i}: {len(context) + len(continuation)} tokens; at most {max_len} fit")
    seqs = [list(c) + list(k) for c, k in requests]
    spans = [(len(c), len(c) + len(k)) for c, k in requests]
    return score_spans(model, seqs, spans, batch_size)


def rolling_windows(tokens: Sequence[int], max_len: int) -> list[tuple[list[int], tuple[int, int]]]:
    """lm-eval `loglikelihood_rolling` windows: every token after the first is scored exactly once,
    each window carrying as much preceding context as fits in max_len (>= 2: a window scores
    max_len - 1 tokens after one of context)."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (one context token and one scored token), got {max_len}")
    windows = []
    start = 1
    while start < len(tokens):
        end = min(start + max_len - 1, len(tokens))
        ctx_from = max(0, end - max_len)
        windows.append((list(tokens[ctx_from:end]), (start - ctx_from, end - ctx_from)))
        start = end
    return windows


def perplexity(model, documents: Iterable[Sequence[int]], max_len: int, batch_size: int = 8) -> dict:
    """Token-level perplexity over documents (first token of each document is context only)."""
    documents = list(documents)
    for i, doc in enumerate(documents):
        check_token_ids(doc, model.cfg.vocab_size, f"document {i}")
    windows = [w for doc in documents for w in rolling_windows(doc, max_len)]
    if not windows:
        raise DataError("no document has two or more tokens to score")
    scores = score_spans(model, [w for w, _ in windows], [s for _, s in windows], batch_size)
    nll = -sum(s.loglikelihood for s in scores)
    n = sum(s.n_tokens for s in scores)
    return {"nll_per_token": nll / n, "perplexity": math.exp(nll / n), "tokens": n}
