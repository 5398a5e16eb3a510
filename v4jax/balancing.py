"""MoE load balancing in training (training spec §1–2): the auxiliary-loss-free gate-bias update
and the sequence-wise balance loss. Hash-routed layers have neither (their routing is fixed).

Both read the routing of a step: `ids` [batch, T, k] chosen experts, `scores` [batch, T, E] the
unbiased affinities sqrt(softplus(u)), and `mask` [batch, T] (1 for real tokens; padding is
excluded from counts, loads and the loss).
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


def sequence_balance_loss(scores, ids, mask) -> jax.Array:
    """V3's sequence-wise balance loss sum_i f_i P_i, averaged over the sequences with real tokens.

    f_i = E / (k T) * #tokens of the sequence that picked expert i, P_i = mean over its tokens
    of the normalised affinity s_i / sum_j s_j (T: the sequence's real tokens). The gradient
    reaches the gate only through P.
    """
    n_experts, k = scores.shape[-1], ids.shape[-1]
    m = mask.astype(jnp.float32)
    t = m.sum(-1)  # [batch]
    picked = (jax.nn.one_hot(ids, n_experts, dtype=jnp.float32).sum(-2) * m[..., None]).sum(1)  # [batch, E]
    f = jax.lax.stop_gradient(picked * n_experts / (k * jnp.maximum(t, 1.0))[:, None])
    s = scores.astype(jnp.float32)
    p = ((s / jnp.sum(s, -1, keepdims=True)) * m[..., None]).sum(1) / jnp.maximum(t, 1.0)[:, None]
    per_seq = jnp.sum(f * p, -1)
    has = (t > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has) / jnp.maximum(has.sum(), 1.0)
