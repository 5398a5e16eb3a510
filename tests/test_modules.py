"""Each piece of the math against the independent numpy oracle (tests/oracle.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from v4jax import quant
from v4jax.attention import grouped_out_proj, sink_attention
from v4jax.compressor import EMPTY_SCORE, pool_groups
from v4jax.config import ModelConfig
from v4jax.hyper_connections import hc_head, hc_post, hc_pre, sinkhorn
from v4jax.indexer import indexer_scores, prefix_widths, select_topk, select_visible_topk
from v4jax.moe import clamped_swiglu, gate_scores, route
from v4jax.rope import apply_rope, layer_inv_freq, rope_inv_freq

RNG = np.random.default_rng(0)
FLASH = ModelConfig.from_json("configs/flash.json")


def f32(*shape, scale=1.0):
    return (RNG.normal(size=shape) * scale).astype(np.float32)


def close(a, b, tol=2e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=tol, atol=tol * max(1.0, np.abs(b).max()))


def test_yarn_keeps_pairs_up_to_15_and_divides_pairs_from_25_by_16():
    plain = rope_inv_freq(64, 160000, None)
    yarn = layer_inv_freq(FLASH, 4)
    np.testing.assert_array_equal(yarn[:16], plain[:16])
    np.testing.assert_allclose(yarn[25:], plain[25:] / 16, rtol=1e-6)
    assert np.all((yarn[16:25] < plain[16:25]) & (yarn[16:25] > plain[16:25] / 16))
    yarn_cfg = {"factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1}
    close(yarn, oracle.rope_inv_freq(64, 160000, yarn_cfg), 1e-6)
    close(layer_inv_freq(FLASH, 0), oracle.rope_inv_freq(64, 10000), 1e-6)


def test_rope_rotates_only_trailing_interleaved_pairs_and_inverts():
    x = f32(5, 3, 96)
    pos = np.array([0, 1, 7, 300, 1000])  # angles are float32 as in the reference; large p loses digits
    inv = layer_inv_freq(FLASH, 128)
    y = np.asarray(apply_rope(jnp.asarray(x), pos[:, None], inv))
    np.testing.assert_array_equal(y[..., :32], x[..., :32])
    close(y[..., 32:], oracle.apply_rope_interleaved(x[..., 32:], pos, inv.astype(np.float64)), 1e-4)
    back = apply_rope(jnp.asarray(y), pos[:, None], inv, inverse=True)
    close(back, x, 1e-5)


def test_sinkhorn_matches_spec_order_and_columns_sum_to_one():
    logits = f32(7, 4, 4, scale=3.0)
    c = np.asarray(sinkhorn(jnp.asarray(logits), 20, 1e-6))
    close(c, oracle.sinkhorn(logits, 20, 1e-6), 1e-5)
    np.testing.assert_allclose(c.sum(-2), 1.0, atol=1e-5)


def test_hc_pre_post_head_match_oracle():
    n, d = 4, 32
    x = f32(1, 6, n, d)
    fn, base, scale = f32(24, n * d, scale=0.1), f32(24), f32(3)
    y, post, comb = hc_pre(jnp.asarray(x), fn, base, scale, iters=20, hc_eps=1e-6, norm_eps=1e-6)
    ry, rpost, rc = oracle.hc_pre(x[0], fn, base, scale, 1e-6, 1e-6, 20)
    close(y[0], ry), close(post[0], rpost), close(comb[0], rc)
    o = f32(1, 6, d)
    close(hc_post(jnp.asarray(o), jnp.asarray(x), post, comb)[0], oracle.hc_post(o[0], x[0], rpost, rc))
    hfn, hbase, hscale = f32(n, n * d, scale=0.1), f32(n), f32(1)
    close(hc_head(jnp.asarray(x), hfn, hbase, hscale, hc_eps=1e-6, norm_eps=1e-6)[0],
          oracle.hc_head(x[0], hfn, hbase, hscale, 1e-6, 1e-6))


@pytest.mark.parametrize("ratio, overlap", [(4, True), (4, False), (8, False)])
def test_compressor_pooling_matches_oracle_including_group_zero(ratio, overlap):
    groups, c = 5, 6
    width = 2 * c if overlap else c
    a, z = f32(groups * ratio, width), f32(groups * ratio, width, scale=2.0)
    # ext layout: one empty group before group 0 (no previous slots for entry 0).
    ext_a = np.concatenate([np.zeros((ratio, width), np.float32), a])[None]
    ext_z = np.concatenate([np.full((ratio, width), EMPTY_SCORE, np.float32), z])[None]
    got = pool_groups(jnp.asarray(ext_a), jnp.asarray(ext_z), ratio, overlap)[0]
    close(got, oracle.compress(a, z, ratio, overlap))
    if overlap:  # entry 0 uses only its own B halves
        w = np.exp(z[:ratio, c:] - z[:ratio, c:].max(0))
        close(got[0], (w / w.sum(0) * a[:ratio, c:]).sum(0))


def test_indexer_scores_and_topk_set_match_oracle():
    s, heads, dim, n, ratio, k = 12, 3, 16, 9, 4, 2
    q, keys, w = f32(s, heads, dim), f32(n, dim), f32(s, heads)
    scores = indexer_scores(jnp.asarray(q)[None], jnp.asarray(keys)[None], jnp.asarray(w)[None])
    ref = oracle.indexer_scores(q, keys, w)
    close(scores[0], ref, 1e-5)
    positions = np.arange(20, 20 + s) - 15  # some queries see no complete group yet
    visible = np.arange(n)[None, :] < ((positions + 1) // ratio)[:, None]
    idx, valid = select_topk(scores, jnp.asarray(visible)[None], k)
    got = [set(np.asarray(idx[0, t])[np.asarray(valid[0, t])].tolist()) for t in range(s)]
    assert got == oracle.indexer_topk(ref, positions, ratio, k)


def test_indexer_over_the_visible_prefix_picks_the_slots_of_scoring_every_entry():
    heads, dim, n, ratio, k, s = 2, 8, 40, 4, 3, 6
    widths = prefix_widths(n, k, 8)
    assert widths == (5, 10, 15, 20, 25, 30, 35, 40) and prefix_widths(6, 4, 8) == (4, 5, 6)
    keys = f32(n, dim)
    pick = jax.jit(lambda q, w, vis, n_vis: select_visible_topk(q, keys[None], w, vis, k, n_vis, widths))
    for first in (0, 9, 50, 150):  # queries that see 0-2 entries (fewer than k), ~13, all 40
        positions = np.arange(first, first + s)
        q, w = f32(s, heads, dim), f32(s, heads)
        visible = np.arange(n)[None, :] < ((positions + 1) // ratio)[:, None]
        visible[:, 1] = False  # an entry of another document: visibility need not be a prefix
        n_vis = min(n, (positions[-1] + 1) // ratio)
        idx, valid, picked = pick(jnp.asarray(q)[None], jnp.asarray(w)[None], jnp.asarray(visible)[None], n_vis)
        ref = oracle.indexer_scores(q, keys, w)
        for t in range(s):
            seen = np.nonzero(visible[t])[0]
            want = seen[np.argsort(-ref[t, seen], kind="stable")[:k]]
            real = np.asarray(idx[0, t])[np.asarray(valid[0, t])]
            assert sorted(real.tolist()) == sorted(want.tolist()), (first, t)
            if real.size:
                close(np.asarray(picked[0, t])[np.asarray(valid[0, t])], ref[t, real])
        full = select_topk(indexer_scores(jnp.asarray(q)[None], jnp.asarray(keys)[None], jnp.asarray(w)[None]),
                           jnp.asarray(visible)[None], k)
        np.testing.assert_array_equal(idx, full[0])  # the very slots, invalid ones included
        np.testing.assert_array_equal(valid, full[1])


def test_attention_with_sink_over_shared_and_gathered_keys_matches_oracle():
    s, heads, d, n_win, n_sel = 4, 3, 8, 5, 2
    q, win, sel = f32(s, heads, d), f32(n_win, d), f32(s, n_sel, d)
    win_mask = np.tril(np.ones((s, n_win), bool), 1)
    sel_mask = np.array([[True, False], [True, True], [False, False], [True, True]])
    sink = f32(heads)
    got = sink_attention(jnp.asarray(q)[None], [(jnp.asarray(win)[None], jnp.asarray(win_mask)[None]),
                                               (jnp.asarray(sel)[None], jnp.asarray(sel_mask)[None])],
                         jnp.asarray(sink), 0.3)[0]
    kv_list = [np.concatenate([win[win_mask[t]], sel[t][sel_mask[t]]]) for t in range(s)]
    close(got, oracle.attention_with_sink(q, kv_list, sink, 0.3))


def test_grouped_output_projection_matches_oracle():
    s, heads, d, groups, rank, dim = 3, 4, 8, 2, 5, 7
    o, wo_a, wo_b = f32(s, heads, d), f32(groups * rank, heads * d // groups), f32(dim, groups * rank)
    u = grouped_out_proj(jnp.asarray(o)[None], jnp.asarray(wo_a.reshape(groups, rank, -1)), jnp.float32)[0]
    close(u @ wo_b.T, oracle.grouped_out_proj(o, wo_a, wo_b, groups))


@pytest.mark.parametrize("hashed", [False, True])
def test_gate_matches_oracle_for_score_and_hash_layers(hashed):
    s, dim, e, k = 6, 16, 8, 3
    x, wg, bias = f32(s, dim), f32(e, dim), f32(e)
    rows = RNG.integers(0, e, size=(s, k))
    scores = gate_scores(jnp.asarray(x), jnp.asarray(wg))
    close(scores, oracle.gate_scores(x, wg), 1e-5)
    ids, w = route(scores, k, 1.5, bias=None if hashed else jnp.asarray(bias),
                   hash_ids=jnp.asarray(rows) if hashed else None)
    rids, rw = oracle.route(np.asarray(scores, np.float64), None if hashed else bias, rows if hashed else None, k, 1.5)
    order, rorder = np.argsort(ids, -1), np.argsort(rids, -1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(ids), order, -1), np.take_along_axis(rids, rorder, -1))
    close(np.take_along_axis(np.asarray(w), order, -1), np.take_along_axis(rw, rorder, -1), 1e-5)


def test_clamped_swiglu_matches_oracle():
    dim, f = 8, 16
    x, w1, w2, w3 = f32(5, dim, scale=4.0), f32(f, dim), f32(dim, f), f32(f, dim)
    h = clamped_swiglu(jnp.asarray(x @ w1.T), jnp.asarray(x @ w3.T), 10.0)
    assert float(jnp.abs(x @ w1.T).max()) > 10  # the clamp is exercised
    close(np.asarray(h) @ w2.T, oracle.swiglu_clamped(x, w1, w2, w3, 10.0), 1e-5)


def test_fake_quant_matches_oracle_bit_for_bit():
    x = f32(40, 256, scale=3.0)
    np.testing.assert_array_equal(np.asarray(quant.fake_quant_fp8(jnp.asarray(x), 128)), oracle.fp8_act_quant(x, 128))
    np.testing.assert_array_equal(np.asarray(quant.fake_quant_fp4(jnp.asarray(x[:, :128]))),
                                  oracle.fp4_fake_quant(x[:, :128]))
    np.testing.assert_array_equal(quant.sylvester_hadamard(128) / np.sqrt(128), oracle.hadamard(128))
