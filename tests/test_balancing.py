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


def test_sequence_balance_loss_of_packed_rows_is_the_mean_over_their_documents():
    """Training spec §10.2: with packing the loss's sequence is each document (its segment id), the
    padding between and after documents excluded; a document id may recur in another row."""
    scores, ids, _ = routing(2, t=12)
    scores, ids = scores[:2], ids[:2]
    e, k = scores.shape[-1], ids.shape[-1]
    sequence = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 3, 3, 0, 0],  # three documents, padding between and after
                         [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]])  # two
    losses = []
    for b, doc in [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2)]:
        real = np.flatnonzero(sequence[b] == doc)
        f = np.array([sum(i in ids[b, r] for r in real) for i in range(e)]) * e / (k * len(real))
        s = scores[b, real] / scores[b, real].sum(-1, keepdims=True)
        losses.append(np.sum(f * s.mean(0)))
    got = balancing.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(ids), jnp.asarray(sequence))
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)
    # Not the per-row loss: the documents' own normalisations differ from their row's.
    per_row = balancing.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(ids), jnp.asarray(sequence != 0))
    assert abs(float(per_row) - float(got)) > 1e-3


def test_expert_loads_per_layer_are_max_and_min_over_mean_in_model_order():
    """Layers in model order from a segment's [reps, E] counts per unit block (layer rep * 2 + j
    for a unit of two), then the MTP block's."""
    from v4jax import train

    rng = np.random.default_rng(4)
    hash_seg = rng.integers(0, 9, (1, 6)).astype(np.float32)  # one hash-routed layer
    unit = [rng.integers(0, 9, (2, 6)).astype(np.float32) for _ in range(2)]  # [hca, csa] x 2
    mtp = rng.integers(1, 9, 6).astype(np.float32)
    routing_stats = {"layers": [[{"counts": jnp.asarray(hash_seg)}], [{"counts": jnp.asarray(c)} for c in unit]],
                     "mtp": {"counts": jnp.asarray(mtp)}}
    layers = np.stack([hash_seg[0], unit[0][0], unit[1][0], unit[0][1], unit[1][1], mtp])
    got = train.expert_loads(routing_stats)
    np.testing.assert_allclose(np.asarray(got["expert_load_max"]), layers.max(1) / layers.mean(1), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got["expert_load_min"]), layers.min(1) / layers.mean(1), rtol=1e-6)
    assert float(got["max_expert_load"]) == pytest.approx((layers.max(1) / layers.mean(1)).max(), rel=1e-6)


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


# ---------------------------------------------------------------------------- in the model
def test_forward_routing_statistics_and_bias_update_equal_the_oracle_routing(monkeypatch):
    """Counts per layer (main and MTP, the MTP's stand-in last position excluded), the balance
    loss per bias-routed layer and the bias update, from the routing the numpy oracle takes."""
    import oracle
    from flax import nnx
    from test_model import RAW, oracle_params, randomize

    from v4jax import train
    from v4jax.checkpoint import weights
    from v4jax.config import ModelConfig
    from v4jax.model import Transformer

    cfg = ModelConfig.from_dict(RAW, dtype="float32", quant_sim=False)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    randomize(model, seed=3)
    ids = np.asarray(jax.random.randint(jax.random.key(5), (2, 40), 0, cfg.vocab_size))
    stats = nnx.jit(lambda m, x: m.forward(x, mtp=True, routing=True)[3])(model, jnp.asarray(ids))

    calls = []
    real_route = oracle.route

    def recording_route(scores, bias, rows, topk, scale):
        out = real_route(scores, bias, rows, topk, scale)
        calls.append((scores, out[0]))
        return out

    monkeypatch.setattr(oracle, "route", recording_route)
    oracle.forward(RAW, oracle_params(model), ids)
    n_layers, e, k = cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok
    assert len(calls) == 2 * (n_layers + 1)

    def expected(layer, hashed):
        counts, balances = np.zeros(e), []
        for b in range(2):
            scores, chosen = calls[b * (n_layers + 1) + layer]
            if layer == n_layers:  # MTP: the last position routes a stand-in token
                scores, chosen = scores[:-1], chosen[:-1]
            counts += np.bincount(chosen.ravel(), minlength=e)
            f = np.bincount(chosen.ravel(), minlength=e) * e / (k * len(chosen))
            balances.append(np.sum(f * (scores / scores.sum(-1, keepdims=True)).mean(0)))
        return counts, 0.0 if hashed else np.mean(balances)

    layer = 0
    placed = []  # (layer index, segment, block, repetition)
    for s, seg in enumerate(cfg.layer_plan):
        for rep in range(seg.reps):
            for j, _ in enumerate(seg.unit):
                placed.append((layer, s, j, rep))
                layer += 1
    for layer, s, j, rep in placed:
        counts, balance = expected(layer, layer < cfg.num_hash_layers)
        np.testing.assert_array_equal(np.asarray(stats["layers"][s][j]["counts"][rep]), counts, err_msg=f"{layer}")
        assert float(stats["layers"][s][j]["balance"][rep]) == pytest.approx(balance, rel=1e-5, abs=1e-9)
    mtp_counts, mtp_balance = expected(n_layers, False)
    np.testing.assert_array_equal(np.asarray(stats["mtp"]["counts"]), mtp_counts)
    assert float(stats["mtp"]["balance"]) == pytest.approx(mtp_balance, rel=1e-5)

    before = weights.to_flat(model)
    train.update_router_biases(model, stats, 1e-3)
    after = weights.to_flat(model)
    for layer, s, j, rep in placed:
        name = f"layers.{layer}.ffn.gate.bias"
        if layer < cfg.num_hash_layers:
            assert name not in after
            continue
        counts, _ = expected(layer, False)
        want = np.asarray(before[name]) + 1e-3 * np.sign(counts.mean() - counts)
        np.testing.assert_allclose(np.asarray(after[name]), want, rtol=0, atol=1e-7, err_msg=name)
    want = np.asarray(before["mtp.0.ffn.gate.bias"]) + 1e-3 * np.sign(mtp_counts.mean() - mtp_counts)
    np.testing.assert_allclose(np.asarray(after["mtp.0.ffn.gate.bias"]), want, rtol=0, atol=1e-7)


@pytest.mark.slow  # two 2-layer forwards with routing statistics: ~60 s of CPU
def test_packed_documents_give_the_balance_loss_and_counts_of_the_documents_run_as_rows():
    """In the model: a row packing two documents (and padding) has, per MoE layer and for the MTP
    block, the counts and balance loss of the same documents run as two rows of their own."""
    from flax import nnx
    from test_train import two_layer_config

    from v4jax.model import Transformer

    cfg = two_layer_config()
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    ids = np.asarray(jax.random.randint(jax.random.key(3), (1, 256), 0, cfg.vocab_size))
    segments = np.zeros((1, 256), np.int32)
    segments[0, :128], segments[0, 128:228] = 1, 2
    stats = nnx.jit(lambda m, x, s: m.forward(x, mtp=True, routing=True, segment_ids=s)[3])
    packed = stats(model, jnp.asarray(ids), jnp.asarray(segments))
    rows = np.zeros((2, 128), ids.dtype)
    rows[0], rows[1, :100] = ids[0, :128], ids[0, 128:228]
    alone = nnx.jit(lambda m, x: m.forward(x, mtp=True, routing=True, lengths=jnp.array([128, 100]))[3])(
        model, jnp.asarray(rows))
    for got, want in [(packed["mtp"], alone["mtp"]), *zip((s for seg in packed["layers"] for s in seg),
                                                          (s for seg in alone["layers"] for s in seg))]:
        np.testing.assert_array_equal(np.asarray(got["counts"]), np.asarray(want["counts"]))
        np.testing.assert_allclose(np.asarray(got["balance"]), np.asarray(want["balance"]), rtol=1e-5)
    assert float(packed["mtp"]["balance"]) > 0
