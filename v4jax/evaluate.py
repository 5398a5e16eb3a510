"""Batch evaluation: per-token log-likelihoods, lm-eval-style requests and perplexity.

All scoring is one full forward per padded batch (right padding is harmless: the
model is causal). Requests are sorted by length and cut into batches whose padded
length is rounded up to a bucket, so a data set compiles a handful of shapes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.sharding import fetch


def token_logprobs(logits, targets):
    """logits: [batch, T, vocab] float32, targets: [batch, T] -> log p(target): [batch, T], greedy hit [batch, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


@nnx.jit
def _score(model, ids):
    """ids: [batch, T] -> log p(ids[:, t+1] | ids[:, :t+1]) and greedy hits, both [batch, T-1]."""
    return token_logprobs(model(ids)[:, :-1], ids[:, 1:])


def bucket(n: int, minimum: int = 16) -> int:
    """Padded length for n tokens: the next power of two (bounds the number of compiled shapes)."""
    return max(minimum, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Score:
    loglikelihood: float  # sum of log p over the scored tokens
    is_greedy: bool  # every scored token is the argmax
    n_tokens: int


def score_spans(model, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                batch_size: int = 8, pad_id: int = 0) -> list[Score]:
    """Log-likelihood of tokens seq[a:b] given seq[:a], for each (seq, (a, b)) with a >= 1."""
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
            if not 1 <= a <= b <= len(sequences[i]):
                raise ValueError(f"request {i}: span {(a, b)} is not inside a sequence of {len(sequences[i])} tokens")
            # logp[:, t] scores token t + 1
            out[i] = Score(float(logp[row, a - 1:b - 1].sum()), bool(greedy[row, a - 1:b - 1].all()), b - a)
    return out


def loglikelihood(model, requests: Iterable[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8) -> list[Score]:
    """lm-eval `loglikelihood`: for each (context, continuation) token lists, log p(continuation | context)."""
    requests = list(requests)
    for i, (context, continuation) in enumerate(requests):
        if not context or not continuation:
            raise ValueError(f"request {i}: context and continuation must both be non-empty token lists")
    seqs = [list(c) + list(k) for c, k in requests]
    spans = [(len(c), len(c) + len(k)) for c, k in requests]
    return score_spans(model, seqs, spans, batch_size)


def rolling_windows(tokens: Sequence[int], max_len: int) -> list[tuple[list[int], tuple[int, int]]]:
    """lm-eval `loglikelihood_rolling` windows: every token after the first is scored exactly once,
    each window carrying as much preceding context as fits in max_len."""
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
    windows = [w for doc in documents for w in rolling_windows(doc, max_len)]
    if not windows:
        raise ValueError("no document has two or more tokens to score")
    scores = score_spans(model, [w for w, _ in windows], [s for _, s in windows], batch_size)
    nll = -sum(s.loglikelihood for s in scores)
    n = sum(s.n_tokens for s in scores)
    return {"nll_per_token": nll / n, "perplexity": math.exp(nll / n), "tokens": n}
