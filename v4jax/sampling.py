"""Next-token sampling: greedy, temperature, top-k, top-p, on device and per sequence.

Every parameter is an array with one value per sequence, so one compiled decode
step serves any mix of settings. Randomness comes from one key per sequence folded
with the position of the token being drawn: the same seed gives the same tokens,
however the prompts are batched or chunked.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k 0 and top_p 1 disable those filters."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits, top_k, top_p):
    """Keep the top_k largest logits, then the smallest set of those whose probability reaches top_p.

    logits: [batch, vocab] float32; top_k: [batch] int (0: all); top_p: [batch] float.
    Returns logits with -inf outside the kept set (ties with the last kept value are kept too).
    The sort is skipped when no row filters (its result would be the logits unchanged).
    """
    return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), _filter, lambda lg, *_: lg, logits, top_k, top_p)


def _filter(logits, top_k, top_p):
    vocab = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)  # [batch, vocab], largest first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_k = jnp.arange(vocab) < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1))  # the first is always kept
    n_keep = jnp.sum(keep, axis=-1)
    threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(logits, keys, temperature, top_k, top_p):
    """logits: [batch, vocab] float32; keys: [batch] PRNG keys; settings [batch] -> tokens [batch] int32."""
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    filtered = filter_logits(logits / t, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def sequence_keys(seed: int, ids) -> jax.Array:
    """One PRNG key per sequence: [n] keys from a seed and the sequences' request indices [n]."""
    base = jax.random.key(seed)
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids, jnp.uint32))


def token_keys(keys, positions) -> jax.Array:
    """keys: [batch] sequence keys, positions: [batch] position of the token being drawn -> [batch] keys."""
    return jax.vmap(jax.random.fold_in)(keys, positions)


def token_probs(logits, temperature, top_k, top_p):
    """The distribution `sample` draws from: logits [batch, vocab] float32, settings [batch] -> probs [batch, vocab].

    Greedy rows (temperature 0) get the one-hot of the argmax, so drawing from it
    (`draw`) is the argmax exactly, as in `sample`.
    """
    t = jnp.where(temperature > 0, temperature, 1.0)[:, None]
    soft = jax.nn.softmax(filter_logits(logits / t, top_k, top_p), axis=-1)
    hard = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=soft.dtype)
    return jnp.where((temperature > 0)[:, None], soft, hard)


def draw(probs, keys):
    """probs: [batch, vocab] (need not sum to 1; zeros are never drawn), keys: [batch] -> tokens [batch] int32."""
    return jax.vmap(jax.random.categorical)(keys, jnp.log(probs)).astype(jnp.int32)
