"""MoE balancing against numpy written from the training spec §1 on a known routing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax import balancing


def routing(seed=0, batch=3, t=7, e=6, k=2):
    rng = np.random.default_rng(seed)
    scores = np.sqrt(np.log1p(np.exp(rng.normal(size=(batch, t, e)))))
    ids = np.stack([[rng.choice(e, k, replace=False) for _ in range(t)] for _ in range(batch)])
    mask = np.ones((batch, t), np.int32)
    mask[1, 5:] = 0  # padding
    mask[2, :] = 0  # a row of padding only
    return scores, ids, mask


def test_bias_update_moves_each_expert_against_its_load_from_real_tokens_only():
    scores, ids, mask = routing()
    e = scores.shape[-1]
    counts = np.zeros(e)
    for b, t, slot in np.ndindex(*ids.shape):
        if mask[b, t]:
            counts[ids[b, t, slot]] += 1
    got = balancing.expert_counts(jnp.asarray(ids), e, jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(got), counts)
    bias = np.linspace(-0.5, 0.5, e).astype(np.float32)
    new = np.asarray(balancing.bias_update(jnp.asarray(bias), got, 1e-3))
    want = bias + 1e-3 * np.where(counts > counts.mean(), -1, np.where(counts < counts.mean(), 1, 0))
    np.testing.assert_allclose(new, want, rtol=0, atol=1e-7)
    assert float(balancing.load_ratio(got)) == pytest.approx(counts.max() / counts.mean())


def test_sequence_balance_loss_is_the_v3_formula_averaged_over_sequences():
    scores, ids, mask = routing()
    batch, _, e = scores.shape
    k = ids.shape[-1]
    losses = []
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        if not len(real):
            continue
        t = len(real)
        f = np.array([sum(i in ids[b, r] for r in real) for i in range(e)]) * e / (k * t)
        s = scores[b, real] / scores[b, real].sum(-1, keepdims=True)
        losses.append(np.sum(f * s.mean(0)))
    got = balancing.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(ids), jnp.asarray(mask))
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)


def test_balance_loss_gradient_reaches_scores_only_through_p():
    scores, ids, mask = routing(1)
    e = scores.shape[-1]
    g = jax.grad(lambda s: balancing.sequence_balance_loss(s, jnp.asarray(ids), jnp.asarray(mask)))(
        jnp.asarray(scores, jnp.float32))
    # d/ds of sum_i f_i * mean_t s_i/sum_j s_j for row 0 (t = 7 real tokens), numpy by hand.
    real = np.flatnonzero(mask[0])
    f = np.array([sum(i in ids[0, r] for r in real) for i in range(e)]) * e / (ids.shape[-1] * len(real))
    s = scores[0, 0]
    z = s.sum()
    want = (f / z - np.sum(f * s) / z**2) / len(real) / 2  # two sequences with real tokens
    np.testing.assert_allclose(np.asarray(g)[0, 0], want, rtol=1e-4)
    assert np.all(np.asarray(g)[2] == 0)
