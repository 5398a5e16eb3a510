"""MoE load balancing in training (training spec §1–2): the auxiliary-loss-free gate-bias update
and the sequence-wise balance loss. Hash-routed layers have neither (their routing is fixed).

Both read the routing of a step: `ids` [batch, T, k] chosen experts, `scores` [batch, T, E] the
unbiased affinities sqrt(softplus(u)), and which tokens count (`mask` [batch, T], 1 for real
tokens; the loss's `sequence` also says which packed document each is in): padding is excluded
from counts, loads and the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# V4 pre-training (report §4.2.2): bias speed 0.001, balance-loss weight 0.0001.
BIAS_UPDATE_RATE = 1e-3
BALANCE_LOSS_WEIGHT = 1e-4


def expert_counts(ids, n_experts: int, mask) -> jax.Array:
    """(token, slot) assignments per expert over the real tokens: [E] float32."""
    hits = jax.nn.one_hot(ids, n_experts, dtype=jnp.float32) * mask[..., None, None].astype(jnp.float32)
    return hits.reshape(-1, n_experts).sum(0)


def bias_update(bias, counts, rate: float = BIAS_UPDATE_RATE):
    """b <- b + rate * sign(mean(c) - c) over the last axis (experts; leading axes: stacked layers):
    overloaded experts become less likely to be picked. `counts` are the whole global batch's."""
    return bias + rate * jnp.sign(jnp.mean(counts, axis=-1, keepdims=True) - counts)


def load_ratio(counts) -> jax.Array:
    """max / mean expert load over the last axis (1 = perfectly balanced)."""
    return jnp.max(counts, axis=-1) / jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)


def sequence_balance_loss(scores, ids, sequence) -> jax.Array:
    """V3's sequence-wise balance loss sum_i f_i P_i, averaged over the sequences with real tokens.

    sequence: [batch, T] int, 0 for tokens that do not count (padding), else which sequence of
    its row the token belongs to (a packed document: training spec §10.2; a 0/1 mask makes each
    row one sequence). f_i = E / (k T) * #tokens of the sequence that picked expert i, P_i = mean
    over its tokens of the normalised affinity s_i / sum_j s_j (T: the sequence's tokens). The
    gradient reaches the gate only through P.
    """
    n_experts, k = scores.shape[-1], ids.shape[-1]
    t_len = sequence.shape[1]
    m = (sequence != 0).astype(jnp.float32)
    s = scores.astype(jnp.float32)
    per_token = jnp.concatenate([m[..., None],  # [batch, T, 1 + 2E]: token, picks, normalised affinities
                                 jax.nn.one_hot(ids, n_experts, dtype=jnp.float32).sum(-2) * m[..., None],
                                 s / jnp.sum(s, -1, keepdims=True) * m[..., None]], -1)
    # Row by row, the tokens of each sequence summed: [batch, T + 1, 1 + 2E] (bucket 0: the excluded).
    sums = jax.vmap(lambda x, seq: jax.ops.segment_sum(x, seq, num_segments=t_len + 1))(
        per_token, jnp.clip(sequence, 0, t_len))
    t, picked, p = sums[..., 0], sums[..., 1:1 + n_experts], sums[..., 1 + n_experts:]
    f = jax.lax.stop_gradient(picked * n_experts / (k * jnp.maximum(t, 1.0))[..., None])
    per_seq = jnp.sum(f * p, -1) / jnp.maximum(t, 1.0)  # [batch, T + 1]
    has = (t > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has) / jnp.maximum(has.sum(), 1.0)
