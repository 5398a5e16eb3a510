"""Token-level helpers the runtime shares (generation, evaluation, training): padded lengths,
per-token log-probabilities and the range check every token id passes before it reaches the model."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from v4jax.errors import DataError


def bucket(n: int, minimum: int = 16) -> int:
    """Padded length for n tokens: the next power of two (bounds the number of compiled shapes)."""
    return max(minimum, 1 << (n - 1).bit_length())


def token_logprobs(logits, targets):
    """logits: [batch, T, vocab] float32, targets: [batch, T] -> log p(target): [batch, T], greedy hit [batch, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logits, axis=-1) == targets


def check_token_ids(ids: Sequence[int], vocab_size: int, where: str) -> None:
    """Refuse an id outside [0, vocab_size): the embedding lookup would clamp it silently (and the
    log-softmax of its target would be NaN)."""
    try:
        array = np.asarray(ids, np.int64)
        bad = np.flatnonzero((array < 0) | (array >= vocab_size))
        first = int(bad[0]) if bad.size else None
    except OverflowError:  # an id beyond int64 (JSON or the command line allow any size)
        first = next(i for i, t in enumerate(ids) if not 0 <= t < vocab_size)
    if first is not None:
        raise DataError(f"{where}: token id {ids[first]} (position {first}) is outside the vocabulary "
                        f"[0, {vocab_size})")
