"""Batch evaluation: per-token log-likelihoods of scoring windows, lm-eval-style requests, perplexity.

A row of a data set becomes one or more `Window`s: a forward input and the span of it
that is scored. A document is cut into rolling windows (every token after its first
scored once, with as much preceding context as fits); a (context, continuation) pair is
one window scoring the continuation. Windows are grouped by padded length (a power-of-two
bucket), so a batch carries little padding and a data set compiles one program per
bucket; each batch holds as many rows as fit a token budget, a multiple of the mesh's
data-parallel size. Right padding never changes a score: the model is causal and the
routed experts never drop a token.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from flax import nnx

from v4jax.errors import DataError
from v4jax.sharding import fetch
from v4jax.tokens import bucket, check_token_ids, token_logprobs

TOKEN_BUDGET = 8192  # padded tokens per batch when the row count is not given


@nnx.jit
def _score(model, ids):
    """ids: [batch, T] -> log p(ids[:, t+1] | ids[:, :t+1]) and greedy hits, both [batch, T-1]."""
    return token_logprobs(model(ids)[:, :-1], ids[:, 1:])


# ---------------------------------------------------------------------------- windows
@dataclasses.dataclass(frozen=True)
class Window:
    row: int  # the data-set row it scores part of
    tokens: tuple[int, ...]  # the forward's input
    start: int  # tokens[start:end] are scored, each given the tokens before it (start >= 1)
    end: int
    part: int = 0  # the window's place among its row's windows


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


def document_windows(row: int, tokens: Sequence[int], max_len: int) -> list[Window]:
    """A whole document's windows (none for a one-token document: nothing to score)."""
    return [Window(row, tuple(w), a, b, k) for k, (w, (a, b)) in enumerate(rolling_windows(tokens, max_len))]


def continuation_window(row: int, context: Sequence[int], continuation: Sequence[int],
                        max_len: int | None = None) -> Window:
    """log p(continuation | context) as one window; where the two exceed max_len, the context
    loses its oldest tokens (as lm-eval's HF model truncates), the continuation never."""
    if not context or not continuation:
        raise DataError(f"row {row}: context and continuation must both be non-empty token lists")
    seq = list(context) + list(continuation)
    if max_len is not None:
        if len(continuation) >= max_len:
            raise DataError(f"row {row}: a continuation of {len(continuation)} tokens leaves no context within "
                            f"max_len {max_len}")
        seq = seq[-max_len:]
    return Window(row, tuple(seq), len(seq) - len(continuation), len(seq))


# ---------------------------------------------------------------------------- batches
@dataclasses.dataclass(frozen=True)
class Batch:
    windows: tuple[Window, ...]
    rows: int  # padded batch size (>= len(windows)); the program is [rows, width]
    width: int

    @property
    def real_tokens(self) -> int:
        return sum(len(w.tokens) for w in self.windows)

    @property
    def padded_tokens(self) -> int:
        return self.rows * self.width


def batch_rows(width: int, n_windows: int, multiple: int = 1, token_budget: int = TOKEN_BUDGET) -> int:
    """Rows of the batches of one bucket of padded width `width` holding n_windows: as many as fit
    the token budget, but no more than a power-of-two count of `multiple`s (the data-parallel size)
    holds the bucket's windows, so a small data set is not padded to the budget."""
    fit = max(1, token_budget // width // multiple)
    need = 1 << (-(-n_windows // multiple) - 1).bit_length()
    return multiple * min(fit, need)


def plan_batches(windows: Iterable[Window], batch_size: int | None = None, multiple: int = 1,
                 token_budget: int = TOKEN_BUDGET, min_bucket: int = 16) -> list[Batch]:
    """Windows grouped by bucket, longest first within a bucket, cut into batches of `batch_size`
    rows (None: `batch_rows` of the bucket). Batches come in row order of their first window, so a
    run's results fill in from the top."""
    if batch_size is not None and (batch_size < 1 or batch_size % multiple):
        raise ValueError(f"batch_size must be a positive multiple of {multiple}, got {batch_size}")
    by_width: dict[int, list[Window]] = {}
    for w in windows:
        by_width.setdefault(bucket(len(w.tokens), min_bucket), []).append(w)
    batches = []
    for width, group in by_width.items():
        group.sort(key=lambda w: (-len(w.tokens), w.row))
        rows = batch_size or batch_rows(width, len(group), multiple, token_budget)
        batches += [Batch(tuple(group[i:i + rows]), rows, width) for i in range(0, len(group), rows)]
    batches.sort(key=lambda b: min(w.row for w in b.windows))
    return batches


def padded_fraction(batches: Sequence[Batch]) -> float:
    """Share of the batches' [rows, width] token slots that hold padding."""
    total = sum(b.padded_tokens for b in batches)
    return 1 - sum(b.real_tokens for b in batches) / total if total else 0.0


# ---------------------------------------------------------------------------- scoring
@dataclasses.dataclass(frozen=True)
class Score:
    loglikelihood: float  # sum of log p over the scored tokens
    is_greedy: bool  # every scored token is the argmax
    n_tokens: int
    logprobs: tuple[float, ...] = ()  # log p of each scored token, in order


def score_batch(model, batch: Batch, pad_id: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(log p [n], greedy hit [n]) of each window's scored tokens, in batch order. Every process
    of a multi-process run must call it with the same batch (the scores are gathered to all)."""
    ids = np.full((batch.rows, batch.width), pad_id, np.int32)  # [rows, width]
    for r, w in enumerate(batch.windows):
        ids[r, :len(w.tokens)] = w.tokens
    logp, greedy = (fetch(a) for a in _score(model, ids))  # numpy: every process passes the same batch
    # logp[:, t] scores token t + 1
    return [(logp[r, w.start - 1:w.end - 1], greedy[r, w.start - 1:w.end - 1]) for r, w in enumerate(batch.windows)]


Piece = tuple[int, np.ndarray, np.ndarray]  # a scored window of a row: (its part, log p [n], greedy hit [n])


def score(model, windows: Sequence[Window], batches: Sequence[Batch], pad_id: int = 0,
          on_batch: Callable[[Batch, list[tuple[Window, np.ndarray, np.ndarray]]], None] | None = None,
          scored: dict[int, list[Piece]] | None = None) -> Iterator[tuple[int, Score]]:
    """(row, Score) of every row as soon as the batch holding its last window is scored; each
    row's windows are added up in document order. `batches` is a plan of `windows`; scored holds
    the windows of rows an earlier run scored in part (not in `windows`), which count as scored
    here. on_batch(batch, [(window, log p, greedy hit)]) follows each batch's rows."""
    for w in windows:
        if not 1 <= w.start <= w.end <= len(w.tokens):
            raise DataError(f"row {w.row}: span {(w.start, w.end)} is not inside a window of {len(w.tokens)} tokens")
        check_token_ids(w.tokens, model.cfg.vocab_size, f"row {w.row}")
    left: dict[int, int] = {}
    for w in windows:
        left[w.row] = left.get(w.row, 0) + 1
    parts = {row: list(pieces) for row, pieces in (scored or {}).items()}
    for row in [r for r in parts if r not in left]:  # nothing left to score
        yield row, _total(parts.pop(row))
    for batch in batches:
        pieces = list(zip(batch.windows, *zip(*score_batch(model, batch, pad_id))))
        for w, logp, greedy in pieces:
            parts.setdefault(w.row, []).append((w.part, logp, greedy))
            left[w.row] -= 1
            if left[w.row] == 0:
                yield w.row, _total(parts.pop(w.row))
        if on_batch is not None:
            on_batch(batch, pieces)


def _total(pieces: list[Piece]) -> Score:
    """A row's Score from all its windows' pieces (any order)."""
    pieces = sorted(pieces, key=lambda p: p[0])
    logp = np.concatenate([lp for _, lp, _ in pieces]).astype(np.float64)
    return Score(float(logp.sum()), bool(all(g.all() for _, _, g in pieces)), logp.size, tuple(logp.tolist()))


# ---------------------------------------------------------------------------- lm-eval-style entry points
def loglikelihood(model, requests: Iterable[tuple[Sequence[int], Sequence[int]]], batch_size: int | None = None,
                  max_len: int | None = None, multiple: int = 1) -> list[Score]:
    """lm-eval `loglikelihood`: for each (context, continuation) token lists, log p(continuation | context).
    `max_len` (e.g. the checkpoint's max_position_embeddings) bounds each request's total length."""
    requests = list(requests)
    for i, (context, continuation) in enumerate(requests):
        if max_len is not None and len(context) + len(continuation) > max_len:
            raise DataError(f"request {i}: {len(context) + len(continuation)} tokens; at most {max_len} fit")
    windows = [continuation_window(i, c, k) for i, (c, k) in enumerate(requests)]
    return _in_row_order(model, windows, len(requests), batch_size, multiple)


def loglikelihood_rolling(model, documents: Iterable[Sequence[int]], max_len: int, batch_size: int | None = None,
                          multiple: int = 1) -> list[Score]:
    """lm-eval `loglikelihood_rolling`: each whole document's log-likelihood, its first token context only."""
    documents = list(documents)
    for i, doc in enumerate(documents):
        check_token_ids(doc, model.cfg.vocab_size, f"document {i}")
    windows = [w for i, doc in enumerate(documents) for w in document_windows(i, doc, max_len)]
    scores = _in_row_order(model, windows, len(documents), batch_size, multiple)
    return [Score(0.0, True, 0) if s is None else s for s in scores]  # a one-token document scores nothing


def perplexity(model, documents: Iterable[Sequence[int]], max_len: int, batch_size: int | None = None,
               multiple: int = 1) -> dict:
    """Token-level perplexity over documents (first token of each document is context only)."""
    scores = loglikelihood_rolling(model, documents, max_len, batch_size, multiple)
    n = sum(s.n_tokens for s in scores)
    if not n:
        raise DataError("no document has two or more tokens to score")
    nll = -sum(s.loglikelihood for s in scores)
    return {"nll_per_token": nll / n, "perplexity": math.exp(nll / n), "tokens": n}


def _in_row_order(model, windows, n_rows, batch_size, multiple) -> list[Score | None]:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out: list[Score | None] = [None] * n_rows
    for row, s in score(model, windows, plan_batches(windows, batch_size, multiple)):
        out[row] = s
    return out
