"""Routed experts: every matmul choice against the numpy oracle, with float and kept-quantised
weights, empty and overfull experts; gradients alike across choices; expert-parallel dispatch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
from v4jax import moe, quant
from v4jax.config import ModelConfig
from v4jax.errors import ConfigError
from v4jax.low_rank import LowRank
from v4jax.sharding import make_mesh, use_rules
from v4jax.sharding.experts import expert_dispatch

E, F, D, K, LIMIT = 8, 128, 256, 2, 7.0
RNG = np.random.default_rng(0)


def routing(n, overfull):
    """ids, weights [n, K]; overfull: every token's first choice is expert 0 and no token picks 5..7."""
    ids = np.stack([RNG.permutation(5 if overfull else E)[:K] for _ in range(n)]).astype(np.int32)
    if overfull:
        ids[:, 0], ids[:, 1] = 0, np.maximum(ids[:, 1], 1)
    w = RNG.uniform(0.1, 1.0, (n, K)).astype(np.float32)
    return ids, w


def float_experts():
    return tuple(np.asarray(RNG.normal(size=s) * s[-1] ** -0.5, np.float32) for s in ((E, F, D), (E, D, F), (E, F, D)))


def quantised_experts(fmt):
    """(codes, scales) per projection, encoded with the host codecs; and their float64 values (oracle decoders)."""
    ws, ref = [], []
    for w in float_experts():
        if fmt == "fp4":
            enc = [quant.quantize_fp4(m) for m in w]
            codes, scales = np.stack([c for c, _ in enc]), np.stack([quant.encode_e8m0(s) for _, s in enc])
            ref.append(np.stack([oracle.dequant_fp4(c, s) for c, s in zip(codes, scales)]))
        else:
            enc = [quant.quantize_fp8(m) for m in w]
            codes, scales = np.stack([c for c, _ in enc]), np.stack([s for _, s in enc])
            ref.append(np.stack([oracle.dequant_fp8_block(c, s) for c, s in zip(codes, scales)]))
        ws.append((jnp.asarray(codes), jnp.asarray(scales)))
    return tuple(ws), tuple(ref)


def oracle_routed(x, ids, w, ref, act_quant):
    """The routed part of oracle.moe: each expert's tokens through oracle.swiglu_clamped."""
    x = np.asarray(x, np.float64)
    y = np.zeros_like(x)
    for e in range(E):
        rows, slots = np.nonzero(ids == e)
        if rows.size:
            y[rows] += oracle.swiglu_clamped(x[rows], ref[0][e], ref[1][e], ref[2][e], LIMIT, w[rows, slots],
                                             act_quant)
    return y


def run(impl, x, ids, w, ws, act_quant):
    fn = jax.jit(lambda x, ids, w, ws: moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=act_quant,
                                                           n_experts=E, impl=impl))
    return np.asarray(fn(x, ids, w, ws))


def close(got, want, tol):
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.abs(want).max())


@pytest.fixture(scope="module")
def weights():
    fl = float_experts()
    return {"float": (fl, tuple(np.float64(a) for a in fl)), "fp8": quantised_experts("fp8"),
            "fp4": quantised_experts("fp4")}


# n = 3: most experts empty; n = 200 overfull: expert 0 holds every token, 5..7 none.
@pytest.mark.parametrize("n, overfull", [(3, False), (200, True)])
@pytest.mark.parametrize("kind", ["float", "fp8", "fp4"])
def test_every_impl_equals_the_oracle_with_empty_and_overfull_experts(weights, n, overfull, kind):
    ws, ref = weights[kind]
    x = RNG.normal(size=(n, D)).astype(np.float32)
    ids, w = routing(n, overfull)
    act_quant = kind != "float"
    want = oracle_routed(x, ids, w, ref, act_quant)
    # Activation rounding in float32 vs float64 may move a value across an E4M3 step.
    tol = 2e-3 if act_quant else 2e-5
    got = {impl: run(impl, x, ids, w, ws, act_quant) for impl in moe.MOE_IMPLS}
    for impl in moe.MOE_IMPLS:
        close(got[impl], want, tol)
        close(got[impl], got["ragged"], 2e-6)


def test_ids_outside_the_local_experts_contribute_nothing(weights):
    ws, ref = weights["float"]
    x = RNG.normal(size=(40, D)).astype(np.float32)
    ids, w = routing(40, False)
    ids[::3, 1] = -1
    ids[1::4, 0] = E + 2
    kept = (ids >= 0) & (ids < E)
    want = oracle_routed(x, np.where(kept, ids, -1), w, ref, False)
    for impl in moe.MOE_IMPLS:
        close(run(impl, x, ids, w, ws, False), want, 2e-5)


def test_gradients_equal_across_impls(weights):
    ws, _ = weights["float"]
    x = RNG.normal(size=(96, D)).astype(np.float32)
    ids, w = routing(96, True)

    def grads(impl):
        def loss(x, w, ws):
            y = moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=False, n_experts=E, impl=impl)
            return jnp.sum(jnp.sin(y))
        return jax.tree.map(np.asarray, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, ws))

    want = grads("ragged")
    assert np.abs(want[2][0][5:]).max() == 0 and np.abs(want[2][0][0]).max() > 0  # unused experts: no gradient
    for impl in ("tiled", "looped", "gather"):
        jax.tree.map(lambda a, b: close(a, b, 2e-5), grads(impl), want)


@pytest.mark.parametrize("kind", ["fp8", "fp4"])
def test_gradients_over_kept_quantised_experts_equal_across_impls(weights, kind):
    """A frozen FP8/FP4 base (LoRA elsewhere): gradients reach the tokens and routing weights through it."""
    ws, _ = weights[kind]
    x = RNG.normal(size=(96, D)).astype(np.float32)
    ids, w = routing(96, True)

    def grads(impl):
        def loss(x, w):
            y = moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=True, n_experts=E, impl=impl)
            return jnp.sum(jnp.sin(y))
        return jax.tree.map(np.asarray, jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w))

    want = grads("ragged")
    for impl in ("tiled", "looped", "gather"):
        jax.tree.map(lambda a, b: close(a, b, 2e-5), grads(impl), want)


def adapted(ws, ref, rank=3, scale=0.5):
    """LowRank operands (a LoRA pair per expert) over ws, and the oracle's matrices with B A folded in
    (float64)."""
    ops, folded = [], []
    for w, r in zip(ws, ref):
        out, inp = r.shape[1:]
        a, b = RNG.normal(size=(E, rank, inp)) * inp**-0.5, RNG.normal(size=(E, out, rank)) * 0.3
        ops.append(LowRank(w, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), scale))
        folded.append(r + scale * np.einsum("eor,eri->eoi", np.float32(b), np.float32(a)))
    return tuple(ops), tuple(folded)


@pytest.mark.parametrize("kind", ["float", "fp4"])
def test_factored_adapters_equal_folded_weights_for_every_impl(weights, kind):
    """LowRank experts (base float or kept FP4) give the oracle's output with W + s B A per expert."""
    ops, folded = adapted(*weights[kind])
    x = RNG.normal(size=(200, D)).astype(np.float32)
    ids, w = routing(200, True)
    want = oracle_routed(x, ids, w, folded, False)
    for impl in moe.MOE_IMPLS:
        close(run(impl, x, ids, w, ops, False), want, 2e-5)


def test_adapter_gradients_are_the_folded_weights_chain_rule_for_every_impl(weights):
    """Over a frozen FP4 base: dB_e = s dW_e A_eᵀ and dA_e = s B_eᵀ dW_e, with dW_e the gradient of
    the same loss through the folded float matrices; the base gets none."""
    ops, folded = adapted(*weights["fp4"])
    x = RNG.normal(size=(96, D)).astype(np.float32)
    ids, w = routing(96, True)

    def loss(impl):
        def fn(x, ws):
            return jnp.sum(jnp.sin(moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=False, n_experts=E,
                                                       impl=impl)))
        return fn

    dx_f, dw_f = jax.jit(jax.grad(loss("ragged"), argnums=(0, 1)))(x, tuple(np.float32(f) for f in folded))
    pairs = tuple((op.a, op.b) for op in ops)
    for impl in moe.MOE_IMPLS:
        def of_pairs(x, pairs, impl=impl):
            return loss(impl)(x, tuple(LowRank(op.w, a, b, op.scale) for op, (a, b) in zip(ops, pairs)))
        dx, dpairs = jax.jit(jax.grad(of_pairs, argnums=(0, 1)))(x, pairs)
        close(np.asarray(dx), np.asarray(dx_f), 1e-4)
        for (a, b), (da, db), dw in zip(pairs, dpairs, dw_f):
            dw = np.asarray(dw, np.float64)
            close(np.asarray(db), 0.5 * np.einsum("eoi,eri->eor", dw, np.asarray(a)), 1e-4)
            close(np.asarray(da), 0.5 * np.einsum("eor,eoi->eri", np.asarray(b), dw), 1e-4)


def test_looped_chunks_cover_an_expert_longer_than_a_chunk_and_one_filling_it_exactly(weights):
    """Expert 0 takes a full chunk and a rest, expert 1 exactly one full chunk; values and gradients."""
    ws, ref = weights["float"]
    full = moe.CHUNK_ROWS[0]
    n = full + 44
    x = RNG.normal(size=(n, D)).astype(np.float32)
    ids = np.stack([np.zeros(n, np.int32), np.where(np.arange(n) < full, 1, RNG.integers(2, E, n))], 1)
    w = RNG.uniform(0.1, 1.0, (n, K)).astype(np.float32)
    close(run("looped", x, ids, w, ws, False), oracle_routed(x, ids, w, ref, False), 2e-5)

    def grads(impl):
        def loss(x, w, ws):
            return jnp.sum(jnp.sin(moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=False, n_experts=E,
                                                       impl=impl)))
        return jax.tree.map(np.asarray, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, ws))

    jax.tree.map(lambda a, b: close(a, b, 2e-5), grads("looped"), grads("ragged"))


def test_token_chunks_give_the_unchunked_values_and_gradients(weights, monkeypatch):
    """Past MAX_ASSIGNMENTS the tokens run in checkpointed chunks (the last one padded): same outputs
    as the oracle, and the same gradients as one pass, for every impl and a LoRA pair over FP4."""
    ws, ref = weights["float"]
    ops, _ = adapted(*weights["fp4"])
    n = 100
    x = RNG.normal(size=(n, D)).astype(np.float32)
    ids, w = routing(n, True)

    def grads(impl):
        """d/d(x, w, float stacks, LoRA pairs) of a loss through both kinds of operand."""
        def loss(x, w, ws, pairs):
            lora = tuple(LowRank(op.w, a, b, op.scale) for op, (a, b) in zip(ops, pairs))
            return sum(jnp.sum(jnp.sin(moe.grouped_experts(x, ids, w, *operands, limit=LIMIT, act_quant=False,
                                                           n_experts=E, impl=impl))) for operands in (ws, lora))
        pairs = tuple((op.a, op.b) for op in ops)
        return jax.tree.map(np.asarray, jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, w, ws, pairs))

    want = {impl: grads(impl) for impl in moe.MOE_IMPLS}
    monkeypatch.setattr(moe, "MAX_ASSIGNMENTS", 64)  # 32 tokens per chunk: 4 chunks, the last 4 real tokens
    for impl in moe.MOE_IMPLS:
        close(run(impl, x, ids, w, ws, False), oracle_routed(x, ids, w, ref, False), 2e-5)
        jax.tree.map(lambda a, b: close(a, b, 2e-5), grads(impl), want[impl])


def test_the_backward_pass_keeps_no_expert_matrices_per_tile():
    """A gradient's temporaries stay far below one copy of the expert matrices per tile (what the tiled
    path's backward kept before its tiles were checkpointed: 6x what it needs now)."""
    f, n = 512, 512
    ws = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in ((E, f, D), (E, D, f), (E, f, D)))
    x = jax.ShapeDtypeStruct((n, D), jnp.float32)
    ids, w = routing(n, False)
    t = moe.tile_rows(n * K, E)
    per_tile = (n * K + E * (t - 1)) // t * 3 * f * D * 4  # every tile's three matrices, float32
    for impl in ("tiled", "looped"):
        def loss(x, ws, impl=impl):
            return jnp.sum(moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=False, n_experts=E,
                                               impl=impl))
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < per_tile / 3, impl


def test_tile_rows_bound_padding_and_auto_choice():
    assert moe.tile_rows(4096 * 6, 8) == 128 and moe.tile_rows(6, 256) == 1
    for nk, e in [(24576, 256), (2048, 64), (100, 8), (7, 3)]:
        t = moe.tile_rows(nk, e)
        assert t == 1 or 3 * (t - 1) * min(e, nk) <= nk  # padding within a third of the rows
    assert moe.choose_impl(None, 6, 256) == "gather"  # decode
    assert moe.choose_impl(None, 4096 * 6, 256) == moe.MOE_IMPL[jax.default_backend()]
    assert moe.choose_impl("ragged", 6, 256) == "ragged"
    with pytest.raises(ConfigError, match="moe_impl = 'dense'"):
        moe.choose_impl("dense", 6, 256)


def test_moe_impl_is_a_runtime_option():
    cfg = ModelConfig.from_json("configs/tiny.json", moe_impl="gather")
    assert cfg.moe_impl == "gather" and "moe_impl" not in cfg.to_dict()


def test_unknown_moe_impl_fails_when_the_layer_is_built():
    cfg = ModelConfig.from_json("configs/tiny.json", moe_impl="dense")
    with pytest.raises(ConfigError, match="moe_impl = 'dense'"):
        moe.MoE(cfg, cfg.layer_kind(1), nnx.Rngs(0))


def test_decode_reads_only_the_selected_kept_quantised_experts():
    """The compiled decode-sized call reads about the same bytes with 8 and 256 FP4 experts."""
    def bytes_accessed(n_exp):
        codes = jax.ShapeDtypeStruct((n_exp, F, D // 2), jnp.int8)
        scales = jax.ShapeDtypeStruct((n_exp, F, D // quant.FP4_GROUP), jnp.float32)
        codes2 = jax.ShapeDtypeStruct((n_exp, D, F // 2), jnp.int8)
        scales2 = jax.ShapeDtypeStruct((n_exp, D, F // quant.FP4_GROUP), jnp.float32)
        x = jax.ShapeDtypeStruct((1, D), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, K), jnp.int32)
        fn = jax.jit(lambda x, ids, w, ws: moe.grouped_experts(x, ids, w, *ws, limit=LIMIT, act_quant=True,
                                                               n_experts=n_exp))
        ws = ((codes, scales), (codes2, scales2), (codes, scales))
        return fn.lower(x, ids, jax.ShapeDtypeStruct((1, K), jnp.float32), ws).compile().cost_analysis()[
            "bytes accessed"]

    small, large = bytes_accessed(8), bytes_accessed(256)
    stack = 3 * 256 * F * D * (0.5 + 4 / quant.FP4_GROUP)  # codes + scales of all 256 experts
    assert large < 1.1 * small and large < stack / 4


@pytest.mark.parametrize("spec, dispatch", [("expert=8", "gather"), ("data=2,expert=4", "a2a")])
@pytest.mark.parametrize("kind", ["float", "fp8", "fp8+lora"])
def test_expert_parallel_dispatch_equals_local_for_every_impl(weights, spec, dispatch, kind):
    ws, _ = adapted(*weights["fp8"]) if kind == "fp8+lora" else weights[kind]
    n = 64
    x = RNG.normal(size=(n, D)).astype(np.float32)
    ids, w = routing(n, True)
    # With a LoRA term, impls sum a row's products in other orders: FP8 activation steps could flip.
    act_quant = kind == "fp8"
    want = run("ragged", x, ids, w, ws, act_quant)
    with use_rules(make_mesh(spec), "inference", dispatch=dispatch):
        for impl in ("tiled", "looped", "gather"):
            fn = jax.jit(lambda x, ids, w, ws, impl=impl: expert_dispatch(
                moe.grouped_experts, x, ids, w, *ws, limit=LIMIT, act_quant=act_quant, impl=impl))
            close(np.asarray(fn(x, ids, w, ws)), want, 2e-5)
