"""The quantisation-aware simulation bit for bit against numpy written from the spec (§2.0, §2.8, §2.13).

Edges of the UE8M0 scale rule (amax exactly at qmax * 2^k over the whole exponent range,
the amax floors, zero blocks, ragged last blocks), the E4M3 subnormals and the E2M1 ties,
then each simulated step on identical inputs: FP8 activation quant of the FP8 linears
(and none elsewhere), the FP8 KV step, Hadamard + FP4 of indexer queries and keys, and
the FP8 / FP4 cache rows.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
from v4jax import cache, quant
from v4jax.attention import kv_fake_quant
from v4jax.config import ModelConfig
from v4jax.indexer import hadamard_rotate, indexer_scores, rotate_and_quantize, select_topk
from v4jax.linear import Linear
from v4jax.model import Transformer

RNG = np.random.default_rng(0)
TINY = ModelConfig.from_json("configs/tiny.json", dtype="bfloat16")
K = np.arange(-100, 100)
E4M3_GRID = np.unique(np.abs(oracle.decode_e4m3(np.arange(256))[np.isfinite(oracle.decode_e4m3(np.arange(256)))]))
E2M1_GRID = oracle.FP4_E2M1_TABLE[:8]


def bf16(*shape, scale=1.0):
    """Random bf16 values, as float32 numpy."""
    return oracle.round_bf16((RNG.normal(size=shape) * scale).astype(np.float32))


def grid_rows(grid, qmax):
    """One row per k: the format's grid values (signs alternating) times 2^k, amax exactly qmax * 2^k."""
    row = np.resize(np.concatenate([grid, -grid]), 32)
    row[0] = qmax
    return (row[None, :] * np.exp2(K.astype(np.float64))[:, None]).astype(np.float32)


# ---------------------------------------------------------------------------- scale rule
@pytest.mark.parametrize("fmt, qmax, floor_exp", [("fp8", 448.0, -22), ("fp4", 6.0, -126)])
def test_pow2_scale_is_exact_at_every_power_of_two_and_rounds_up_just_above(fmt, qmax, floor_exp):
    k = np.arange(-130, 100)
    at = (qmax * np.exp2(k.astype(np.float64))).astype(np.float32)  # subnormal float32 below k = -128
    above, below = np.nextafter(at, np.float32(np.inf)), np.nextafter(at, np.float32(0))
    want = np.exp2(np.maximum(k, floor_exp).astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(at, fmt)), want)
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(below, fmt)), want)
    up = np.exp2(np.maximum(k + 1, floor_exp).astype(np.float64)).astype(np.float32)
    normal = k >= floor_exp  # where the floor does not decide
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(above, fmt))[normal], up[normal])
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(at, fmt)),
                                  oracle.block_scales(at[:, None], 1, qmax, {"fp8": 1e-4, "fp4": 6 * 2.0**-126}[fmt])[:, 0])


def test_amax_floors_give_the_references_smallest_scales():
    # 1e-4 / 448 lies in (2^-23, 2^-22]: an all-zero or tiny FP8 block gets 2^-22; FP4 stops at 2^-126.
    tiny = np.array([0.0, 1e-30, 5e-5, 1e-4], np.float32)
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(tiny, "fp8")), np.float32(2.0**-22))
    below = np.array([0.0, 1e-39, 6 * 2.0**-127], np.float32)  # zero, subnormal, just under the floor
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(below, "fp4")), np.float32(2.0**-126))
    np.testing.assert_array_equal(np.asarray(quant.pow2_scale(np.float32(6 * 2.0**-126), "fp4")), np.float32(2.0**-126))
    # A block under the FP8 floor is rounded on the floor's grid (5e-5 / 2^-22 = 209.7 -> 208).
    x = np.zeros((1, 128), np.float32)
    x[0, 0] = 5e-5
    assert float(quant.fake_quant_fp8(jnp.asarray(x), 128)[0, 0]) == 208 * 2.0**-22
    zero = np.zeros((2, 64), np.float32)
    for fn in (lambda v: quant.fake_quant_fp8(v, 64), quant.fake_quant_fp4):
        out = np.asarray(fn(jnp.asarray(zero)))
        assert np.all(out == 0) and not np.any(np.signbit(out))


@pytest.mark.parametrize("fmt, qmax, grid", [("fp8", 448.0, E4M3_GRID), ("fp4", 6.0, E2M1_GRID)])
def test_rows_on_the_grid_with_amax_at_qmax_times_2k_are_left_unchanged(fmt, qmax, grid):
    """The defect a floating log2 had: scale 2^(k+1) instead of 2^k, so the row lost a bit."""
    rows = grid_rows(grid, qmax)
    if fmt == "fp8":
        rows = rows[K >= -22]  # below, the 1e-4 floor puts the row on a coarser grid
        out = quant.fake_quant_fp8(jnp.asarray(rows), 32)
    else:
        out = quant.fake_quant_fp4(jnp.asarray(rows))
    np.testing.assert_array_equal(np.asarray(out), rows)
    codes, scales = quant.encode_blocks(jnp.asarray(rows), 32, fmt)
    np.testing.assert_array_equal(np.asarray(scales.astype(jnp.float32))[:, 0], rows[:, 0] / qmax)


def test_e4m3_subnormals_and_ties_round_to_even():
    x = np.zeros((1, 128), np.float32)
    x[0, 0] = 448.0  # scale 1: values below 2^-6 are E4M3 subnormals, multiples of 2^-9
    vals = np.array([2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10, 2.0**-9 * 1.4, 2.0**-6 * (1 + 1 / 16), 2.0**-6 * (1 + 3 / 16),
                     17.0, 19.0, 440.0], np.float32)
    want = np.array([0.0, 2 * 2.0**-9, 2 * 2.0**-9, 2.0**-9, 2.0**-6, 2.0**-6 * (1 + 2 / 8),
                     16.0, 20.0, 448.0], np.float32)
    x[0, 1:1 + len(vals)] = vals
    x[0, 20:20 + len(vals)] = -vals
    out = np.asarray(quant.fake_quant_fp8(jnp.asarray(x), 128))[0]
    np.testing.assert_array_equal(out[1:1 + len(vals)], want)
    np.testing.assert_array_equal(out[20:20 + len(vals)], -want)


def test_e2m1_ties_round_to_even():
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 6.0
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    want = np.array([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0], np.float32)
    x[0, 1:8], x[0, 8:15] = ties, -ties
    out = np.asarray(quant.fake_quant_fp4(jnp.asarray(x)))[0]
    np.testing.assert_array_equal(out[1:8], want)
    np.testing.assert_array_equal(out[8:15], -want)


def test_ragged_last_block_has_its_own_scale():
    x = bf16(3, 200, scale=2.0)
    x[:, :128] *= 1024  # a large first block must not coarsen the 72-wide last one
    got = np.asarray(quant.fake_quant_fp8(jnp.asarray(x, jnp.bfloat16), 128).astype(jnp.float32))
    np.testing.assert_array_equal(got, oracle.round_bf16(oracle.fp8_act_quant(x, 128).astype(np.float32)))
    assert np.abs(got[:, 128:] - x[:, 128:]).max() < 0.07 * np.abs(x[:, 128:]).max()


def test_host_encoders_use_the_same_scales_as_the_device_simulation():
    w = RNG.normal(size=(256, 384)).astype(np.float32) * 0.02
    w[:128, :128] *= 2.0**-12
    w[0, 0] = 448 * 2.0**-20  # block amax exactly at 448 * 2^k
    codes, scale = quant.quantize_fp8(w)
    _, dev = quant.encode_blocks(jnp.asarray(w.reshape(2, 128, 3, 128).transpose(0, 2, 1, 3).reshape(2, 3, -1)),
                                 128 * 128, "fp8")
    np.testing.assert_array_equal(scale, np.asarray(dev.astype(jnp.float32))[..., 0])
    assert scale[0, 0] == 2.0**-20
    values = oracle._round_minifloat(np.clip(w / np.repeat(np.repeat(scale, 128, 0), 128, 1), -448, 448), 3, -6)
    np.testing.assert_array_equal(codes.view(np.uint8), oracle.e4m3_byte(values))
    w4 = (RNG.normal(size=(8, 64)) * 0.1).astype(np.float32)
    w4[0, :32] = oracle.FP4_E2M1_TABLE[np.arange(32) % 16] * 2.0**-30
    _, s4 = quant.quantize_fp4(w4)
    np.testing.assert_array_equal(s4, oracle.block_scales(w4, 32, 6.0, 6 * 2.0**-126))
    assert s4[0, 0] == 2.0**-30


# ---------------------------------------------------------------------------- the simulated steps
def test_fp8_activation_quant_is_applied_exactly_by_the_fp8_linears():
    """With W = I the matmul is exact, so a linear returns its (quantised) input bit for bit."""
    dim = 256
    x = bf16(2, 5, dim, scale=3.0)
    x[0, 0, :128] *= 1024
    want = oracle.round_bf16(oracle.fp8_act_quant(x, 128).astype(np.float32))
    assert not np.array_equal(want, x)
    for fp8, expect in ((True, want), (False, x)):
        lin = Linear(dim, dim, TINY, nnx.Rngs(0), (None, None), fp8=fp8)
        lin.weight[...] = jnp.eye(dim, dtype=jnp.bfloat16)
        got = np.asarray(lin(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
        np.testing.assert_array_equal(got, expect)


def test_fp8_act_quant_sits_on_the_references_linears_only():
    """spec 2.0: wq_a, wq_b, wkv, wo_b, indexer.wq_b, the shared expert, e_proj, h_proj; not the
    compressors or weights_proj (wo_a, the gate and the head are no Linear at all)."""
    model = nnx.eval_shape(lambda: Transformer(TINY, rngs=nnx.Rngs(0)))
    flags = {".".join(str(p) for p in path): node.act_quant
             for path, node in nnx.iter_graph(model) if isinstance(node, Linear)}
    quantised = {"wq_a", "wq_b", "wkv", "wo_b", "e_proj", "h_proj", "w1", "w2", "w3"}
    for name, on in flags.items():
        assert on == (name.split(".")[-1] in quantised and ".compressor." not in name), name
    for name in ("indexer.wq_b", "indexer.weights_proj", "compressor.wkv", "compressor.wgate", "shared_experts.w2",
                 "mtp.0.e_proj"):
        assert any(n.endswith(name) for n in flags), name


def test_fp8_kv_step_rounds_the_non_rope_dims_in_blocks_of_64_and_leaves_rope_dims():
    kv = bf16(3, 7, 512, scale=2.0)
    kv[0, 0, :64] *= 512  # one large block must not leak into its neighbours
    got = np.asarray(kv_fake_quant(jnp.asarray(kv, jnp.bfloat16), 64).astype(jnp.float32))
    want = oracle.round_bf16(oracle.fp8_kv_fake_quant(kv, 448, 64).astype(np.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got[..., 448:], kv[..., 448:])


def test_hadamard_and_fp4_of_indexer_queries_and_keys():
    # Multiples of 2^-12 below 8 in magnitude: the +-1 transform is exact in float32 in any order.
    x = oracle.round_bf16(np.round(RNG.normal(size=(2, 9, 4, 128)) * 2**10) / 2**12)
    np.testing.assert_array_equal(np.asarray(hadamard_rotate(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)),
                                  oracle.hadamard_rotate_bf16(x))
    got = np.asarray(rotate_and_quantize(jnp.asarray(x, jnp.bfloat16), True).astype(jnp.float32))
    np.testing.assert_array_equal(got, oracle.indexer_fp4_bf16(x))
    assert np.asarray(rotate_and_quantize(jnp.asarray(x), False) == x).all()
    # The rotation is orthonormal: dot products survive up to the rounding.
    q, k = x[0, :, 0], x[1, :, 1]
    np.testing.assert_allclose(oracle.hadamard_rotate_bf16(q) @ oracle.hadamard_rotate_bf16(k).T, q @ k.T,
                               atol=0.05 * np.abs(q @ k.T).max())


def test_cache_rows_are_the_spec_byte_layouts():
    flash = ModelConfig.from_json("configs/flash.json")
    kv = oracle.round_bf16(oracle.fp8_kv_fake_quant(bf16(2, 3, 512, scale=3.0), 448).astype(np.float32))
    kv[0, 0, :64] = 0.0  # a zero block: scale byte 127 - 22
    rows = np.asarray(cache.pack_kv(jnp.asarray(kv, jnp.bfloat16), 64))
    assert rows.shape[-1] == cache.kv_row_bytes(flash) == 584
    np.testing.assert_array_equal(rows, oracle.pack_kv_row(kv, 64))
    assert rows[0, 0, 448] == 127 - 22
    keys = oracle.indexer_fp4_bf16(oracle.round_bf16(np.round(RNG.normal(size=(5, 128)) * 2**10) / 2**12))
    packed = np.asarray(cache.pack_keys(jnp.asarray(keys, jnp.bfloat16)))
    assert packed.shape[-1] == cache.key_row_bytes(flash) == 68
    np.testing.assert_array_equal(packed, oracle.pack_index_key(keys))
    np.testing.assert_array_equal(np.asarray(cache.unpack_kv(jnp.asarray(rows), 512, 64, jnp.bfloat16)
                                             .astype(jnp.float32)), kv)
    np.testing.assert_array_equal(np.asarray(cache.unpack_keys(jnp.asarray(packed), 128, jnp.bfloat16)
                                             .astype(jnp.float32)), keys)


def test_indexer_scores_round_to_bf16_as_the_reference_and_top_k_breaks_ties_low():
    """dots, weighted ReLUs and the head sum each rounded to bf16 once; bf16 scores tie often, and the
    top-k keeps the lower entry index of a tie (the oracle's rule)."""
    x = lambda *shape: oracle.round_bf16(np.round(RNG.normal(size=shape) * 2**10) / 2**12)
    q, k = oracle.indexer_fp4_bf16(x(1, 6, 4, 128)), oracle.indexer_fp4_bf16(x(1, 40, 128))
    w = bf16(1, 6, 4, scale=0.05)
    got = indexer_scores(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, w)))
    assert got.dtype == jnp.bfloat16
    dots = oracle.round_bf16(np.einsum("bqhd,bnd->bqhn", q.astype(np.float64), k).astype(np.float32))
    weighted = oracle.round_bf16(np.maximum(dots, 0) * w[..., None])
    want = oracle.round_bf16(weighted.astype(np.float64).sum(axis=2).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
    positions = np.arange(100, 106)
    visible = np.arange(40)[None, :] < ((positions + 1) // 4)[:, None]
    idx, valid = select_topk(got, jnp.asarray(visible)[None], 8)
    chosen = [set(np.asarray(idx[0, t])[np.asarray(valid[0, t])].tolist()) for t in range(6)]
    assert chosen == oracle.indexer_topk(want[0].astype(np.float64), positions, 4, 8)
    assert any(len(np.unique(want[0, t])) < 40 for t in range(6))  # bf16 scores do tie
