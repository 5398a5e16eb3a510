"""Indexer KL losses (training spec §3): the layer's scores and targets and the loss against numpy, and the detach."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
from test_model import oracle_params
from test_packing import RAW, tiny_model
from v4jax import train
from v4jax.attention import Attention
from v4jax.cache import layer_cache
from v4jax.config import LayerKind, ModelConfig
from v4jax.indexer_loss import indexer_kl_loss, indexer_params

assert RAW["compress_ratios"][:2] == [4, 128]  # layer 0 is the CSA layer the numpy code follows
SEQ = 96  # 24 compressed entries, top-k 8: later queries choose


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(5).integers(0, RAW["vocab_size"], (2, SEQ))


def loss_of(mode):
    def loss(m, ids):
        _, _, _, aux = m.forward(ids, indexer_kl=mode)
        return indexer_kl_loss(aux["indexer"], jnp.ones(ids.shape)), aux["indexer"]
    return loss


side_outputs = nnx.jit(lambda m, ids, mode: loss_of(mode)(m, ids), static_argnames="mode")


def numpy_layer(P, tokens):
    """From the token ids: layer 0's indexer scores [S, N], selected sets, and weights(t, entries): the
    weights [H, len(entries)] on those entries of query t's attention over its window, them and the sink."""
    cfg, eps, pre = RAW, RAW["rms_norm_eps"], "layers.0."
    X = np.repeat(P["embed.weight"][tokens][:, None, :], cfg["hc_mult"], axis=1)
    y, _, _ = oracle.hc_pre(X, P[pre + "hc_attn_fn"], P[pre + "hc_attn_base"], P[pre + "hc_attn_scale"],
                            cfg["hc_eps"], eps, cfg["hc_sinkhorn_iters"])
    x = oracle.rms_norm(y, P[pre + "attn_norm.weight"], eps)
    pre += "attn."
    S, H, d = len(tokens), cfg["num_attention_heads"], cfg["head_dim"]
    dr, W = cfg["qk_rope_head_dim"], cfg["sliding_window"]
    inv, pos = oracle.layer_inv_freq(cfg, 4), np.arange(S)
    q_lat = oracle.rms_norm(x @ P[pre + "wq_a.weight"].T, P[pre + "q_norm.weight"], eps)
    q = oracle.rms_norm((q_lat @ P[pre + "wq_b.weight"].T).reshape(S, H, d), None, eps)
    q[..., -dr:] = oracle.apply_rope_interleaved(q[..., -dr:], pos, inv)
    kv = oracle.rms_norm(x @ P[pre + "wkv.weight"].T, P[pre + "kv_norm.weight"], eps)
    kv[:, -dr:] = oracle.apply_rope_interleaved(kv[:, -dr:], pos, inv)
    comp = oracle.compressor_entries(x, P, pre + "compressor.", 4, True, inv, dr, eps)
    scores = []
    selected = oracle.lightning_indexer(x, q_lat, P, pre + "indexer.", cfg, 4, inv, scores_out=scores)

    def weights(t, entries):
        keys = np.concatenate([kv[max(0, t - W + 1):t + 1], comp[entries]])
        s = q[t] @ keys.T * d**-0.5  # [H, keys]
        top = np.maximum(s.max(-1), P[pre + "attn_sink"])
        e = np.exp(s - top[:, None])
        return (e / (e.sum(-1) + np.exp(P[pre + "attn_sink"] - top))[:, None])[:, len(keys) - len(entries):]

    return scores[0], selected, weights


def numpy_kl(p, scores):
    log_q = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())
    return float(np.sum(p * (np.log(p) - log_q)))


def test_dense_and_sparse_losses_match_numpy(model, ids):
    P = oracle_params(model)
    got = {mode: side_outputs(model, jnp.asarray(ids), mode) for mode in ("dense", "sparse")}
    dense, sparse = (jax.tree.map(lambda a: np.asarray(a)[0], got[mode][1][0]) for mode in ("dense", "sparse"))
    want = {"dense": [], "sparse": []}
    for b in range(len(ids)):
        scores, selected, weights = numpy_layer(P, ids[b])
        for t in range(SEQ):
            n = (t + 1) // 4
            np.testing.assert_array_equal(dense["candidates"][b, t], np.arange(SEQ // 4) < n)
            keep = sparse["candidates"][b, t]
            order = np.argsort(sparse["index"][b, t][keep])
            sel = sparse["index"][b, t][keep][order]
            assert set(sel.tolist()) == selected[t], (b, t)
            if not n:
                continue
            # dense: every causal entry, head-summed weights of the dense attention renormalised over them
            p = weights(t, np.arange(n)).sum(0)
            p /= p.sum()
            np.testing.assert_allclose(dense["target"][b, t, :n], p, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(dense["scores"][b, t, :n], scores[t, :n], rtol=1e-4, atol=1e-5)
            want["dense"].append(numpy_kl(p, scores[t, :n]))
            # sparse: the selected entries, weights of the attention the layer runs (window, them, sink)
            p = weights(t, sel).sum(0)
            p /= p.sum()
            np.testing.assert_allclose(sparse["target"][b, t][keep][order], p, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(sparse["scores"][b, t][keep][order], scores[t, sel], rtol=1e-4, atol=1e-5)
            want["sparse"].append(numpy_kl(p, scores[t, sel]))
    for mode in want:  # one CSA layer: the mean KL over the queries that have a candidate
        np.testing.assert_allclose(float(got[mode][0]), np.mean(want[mode]), rtol=1e-4)
    assert np.mean(want["dense"]) > 0.01 and np.mean(want["sparse"]) > 0.01
    assert any(len(s) < (t + 1) // 4 for t, s in enumerate(selected))  # top-k really left entries out


def layer_loss(attn, x, mode):
    """The indexer loss of one CSA attention layer on its input x: [batch, T, dim] (a whole sequence)."""
    b, t, _ = x.shape
    cache = layer_cache(attn.cfg, LayerKind(ratio=4, hash_routed=False), b, t)
    _, _, side = attn(x, cache, jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32), indexer_kl=mode)
    return indexer_kl_loss([jax.tree.map(lambda a: a[None], side)], jnp.ones((b, t)))


@pytest.fixture(scope="module")
def layer():
    """A CSA attention layer and an input for it."""
    attn = Attention(ModelConfig.from_dict(RAW, dtype="float32", quant_sim=False), 4, nnx.Rngs(1))
    attn.attn_sink[...] = jnp.linspace(-1.0, 1.0, RAW["num_attention_heads"])
    return attn, jax.random.normal(jax.random.key(2), (2, SEQ, RAW["hidden_size"]), jnp.float32)


def flat_abs_max(state) -> dict:
    return {".".join(map(str, path)): float(np.abs(np.asarray(v[...])).max()) for path, v in nnx.to_flat_state(state)}


def test_sparse_loss_gives_the_main_model_no_gradient(layer):
    attn, x = layer
    grad = nnx.jit(nnx.grad(lambda m, x: layer_loss(m, x, "sparse"), argnums=(nnx.DiffState(0, nnx.Param), 1)))
    params, dx = grad(attn, x)
    flat = flat_abs_max(params)
    indexer = {k: g for k, g in flat.items() if k.startswith("indexer.")}
    assert len(indexer) == 6 and all(g > 0 for g in indexer.values()), indexer  # wq_b, weights_proj, compressor
    # Nothing upstream of the layer either: the indexer's input is detached.
    assert np.abs(np.asarray(dx)).max() == 0
    assert all(g == 0 for k, g in flat.items() if k not in indexer), {k: g for k, g in flat.items() if k not in indexer}


@pytest.mark.slow
def test_dense_warmup_trains_the_indexer_only(layer):
    model_params = flat_abs_max(nnx.state(tiny_model(), nnx.Param))
    assert set(flat_abs_max(nnx.state(tiny_model(), indexer_params))) == {k for k in model_params if ".indexer." in k}
    attn, x = layer
    grads = nnx.jit(nnx.grad(lambda m, x: layer_loss(m, x, "dense"), argnums=nnx.DiffState(0, indexer_params)))(attn, x)
    flat = flat_abs_max(grads)
    assert set(flat) == {k for k in flat_abs_max(nnx.state(attn, nnx.Param)) if k.startswith("indexer.")}
    assert len(flat) == 6 and all(g > 0 for g in flat.values()), flat


@pytest.mark.slow
def test_lm_loss_adds_the_weighted_indexer_loss_over_real_tokens(model, ids):
    seg = np.ones_like(ids)
    seg[:, 80:] = 0  # padding: no indexer loss there
    step = nnx.jit(lambda m, ids, seg, mode: train.lm_loss(m, ids, jnp.ones(ids.shape), segment_ids=seg,
                                                           indexer_loss=mode, indexer_weight=0.5)[:2],
                   static_argnames="mode")
    off, (off_metrics, _) = step(model, jnp.asarray(ids), jnp.asarray(seg), "off")
    on, (metrics, routing) = step(model, jnp.asarray(ids), jnp.asarray(seg), "sparse")
    sides = nnx.jit(lambda m, ids, seg: m.forward(ids, segment_ids=seg, indexer_kl="sparse")[3]["indexer"])(
        model, jnp.asarray(ids), jnp.asarray(seg))
    want = indexer_kl_loss(sides, jnp.asarray(seg != 0))
    assert "indexer_loss" not in off_metrics and "indexer" not in routing
    np.testing.assert_allclose(float(metrics["indexer_loss"]), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(on), float(off) + 0.5 * float(want), rtol=1e-6)
    assert float(want) != float(indexer_kl_loss(sides, jnp.ones(ids.shape)))  # the padding was left out
