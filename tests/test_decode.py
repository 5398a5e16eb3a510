"""Prefill + decode against one full forward, chunked and batched; the FP8 (FlashMLA) cache layout.

The tiny config has groups of 4 (CSA) and 128 (HCA) and a 128-token window, so
prompt lengths and decode spans below cross every boundary: a prompt shorter than
one group, one ending two tokens past the window and a 128-group, one ending exactly
on the second 128-group.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import cache, quant
from v4jax.attention import kv_fake_quant
from v4jax.config import ModelConfig
from v4jax.generate import Generator
from v4jax.model import Transformer
from v4jax.sampling import Sampling

RAW = json.load(open("configs/tiny.json"))
SEQ = 300
CHUNK = 128  # one prefill bucket: every chunk is padded to 128 tokens, so one program serves all


def assert_close(got, want):
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_dict(RAW, dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def ids():
    return np.asarray(jax.random.randint(jax.random.key(1), (3, SEQ), 0, RAW["vocab_size"]))


@pytest.fixture(scope="module")
def full_logits(model, ids):
    """One whole-sequence forward (fresh state) per row: the reference for every split."""
    return np.asarray(nnx.jit(lambda m, x: m.forward(x)[0])(model, jnp.asarray(ids)))


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model, batch_size=3, max_len=SEQ + 20, prefill_chunk=CHUNK, min_bucket=CHUNK)


def test_batched_prefill_then_decode_matches_full_forward_across_group_and_window_boundaries(gen, ids, full_logits):
    """Rows of unequal lengths prefill together, then decode one token per step (teacher-forced) up
    to SEQ; a row that reached SEQ gets length 0 while the others go on."""
    prompt_lens = np.array([130, 3, 256])
    controls = gen.controls(Sampling(temperature=0))
    _, logits, state = gen.prefill(gen.new_state(), [ids[b, :n] for b, n in enumerate(prompt_lens)], controls)
    for b, n in enumerate(prompt_lens):
        assert_close(logits[b], full_logits[b, n - 1])
    pos = prompt_lens.copy()
    while (pos < SEQ).any():
        active = pos < SEQ
        tokens = np.where(active, ids[np.arange(3), np.minimum(pos, SEQ - 1)], 0)
        _, logits, state = gen.decode(state, tokens, active, controls)
        logits = np.asarray(logits)
        for b in np.flatnonzero(active):
            assert_close(logits[b], full_logits[b, pos[b]])
        pos += active
    np.testing.assert_array_equal(np.asarray(state["pos"]), [SEQ] * 3)


def test_chunked_prefill_from_any_position_matches_full_forward(gen, ids, full_logits):
    """Prompts fed in uneven chunks (a row may sit a call out), then decode across the window."""
    chunks = [[5, 1, 124, 7], [128, 0, 129, 2], [0, 0, 3, 250]]  # per row, per call
    controls = gen.controls(Sampling(temperature=0))
    state = gen.new_state()
    fed = np.zeros(3, int)
    for call in range(4):
        n = [c[call] for c in chunks]
        _, logits, state = gen.prefill(state, [ids[b, fed[b]:fed[b] + n[b]] for b in range(3)], controls)
        fed += n
        for b in range(3):
            if n[b]:
                assert_close(logits[b], full_logits[b, fed[b] - 1])
    np.testing.assert_array_equal(np.asarray(state["pos"]), fed)
    for _ in range(6):
        _, logits, state = gen.decode(state, ids[np.arange(3), fed], np.ones(3, bool), controls)
        assert_close(logits, full_logits[np.arange(3), fed])
        fed += 1


def test_prefill_and_decode_compile_once_per_bucket(gen, ids):
    """Prompt lengths within a bucket, longer prompts (more chunks) and decode steps reuse the same two programs."""
    controls = gen.controls(Sampling(temperature=0.7, top_k=5))
    for lens in ([1, 77, 128], [300, 2, 0]):
        tokens, _, state = gen.prefill(gen.new_state(), [ids[b, :n] for b, n in enumerate(lens)], controls)
        for _ in range(3):
            tokens, _, state = gen.decode(state, tokens, np.array(lens) > 0, controls)
    assert gen.compiled_shapes() == 2  # width 128 (prefill) and width 1 (decode)


def test_decode_leaves_finished_sequences_untouched(gen, ids):
    controls = gen.controls(Sampling(temperature=0))
    tokens, _, state = gen.prefill(gen.new_state(), [ids[0, :10], ids[1, :20], ids[2, :30]], controls)
    before = jax.tree.map(np.asarray, state)
    tokens, _, state = gen.decode(state, tokens, np.array([True, False, True]), controls)
    after = jax.tree.map(np.asarray, state)
    np.testing.assert_array_equal(after["pos"], [11, 20, 31])
    layers = list(zip(jax.tree.leaves(before["layers"]), jax.tree.leaves(after["layers"])))  # [reps, batch, ...]
    for x, y in layers:
        np.testing.assert_array_equal(x[:, 1], y[:, 1])
    assert not all(np.array_equal(x[:, 0], y[:, 0]) for x, y in layers)


# ---------------------------------------------------------------------------- FP8 cache layout
def test_packed_kv_row_is_the_584_byte_flashmla_layout_and_round_trips_exactly():
    flash = ModelConfig.from_json("configs/flash.json")
    assert cache.kv_row_bytes(flash) == 448 + 7 + 1 + 64 * 2 == 584
    assert cache.key_row_bytes(flash) == 64 + 4
    kv = jax.random.normal(jax.random.key(0), (3, 5, 512), jnp.float32).astype(jnp.bfloat16) * 3
    kv = kv_fake_quant(kv, 64)
    rows = cache.pack_kv(kv, 64)
    assert rows.dtype == jnp.uint8 and rows.shape == (3, 5, 584)
    np.testing.assert_array_equal(np.asarray(cache.unpack_kv(rows, 512, 64, jnp.bfloat16)), np.asarray(kv))
    keys = quant.fake_quant_fp4(jax.random.normal(jax.random.key(1), (4, 128), jnp.float32)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cache.unpack_keys(cache.pack_keys(keys), 128, jnp.bfloat16)),
                                  np.asarray(keys))


def test_fp8_cache_layout_gives_the_bf16_caches_logits_under_quant_sim(ids):
    """140 one-token steps (across the window and a 128-group): identical logits at every step.
    Two layers (CSA, HCA) and decode steps only keep this to two compiles."""
    raw = dict(RAW, num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    model = Transformer(ModelConfig.from_dict(raw, dtype="bfloat16", quant_sim=True), rngs=nnx.Rngs(0))
    logits = {}
    for quantized in (False, True):
        gen = Generator(model, batch_size=2, max_len=160, quantized_cache=quantized)
        controls = gen.controls(Sampling(temperature=0))
        state, steps = gen.new_state(), []
        for t in range(140):
            _, step_logits, state = gen.decode(state, ids[:2, t], np.ones(2, bool), controls)
            steps.append(np.asarray(step_logits))
        logits[quantized] = np.stack(steps)
        window = state["layers"][0][0]["window"]
        assert window.dtype == (jnp.uint8 if quantized else jnp.bfloat16)
    np.testing.assert_array_equal(logits[True], logits[False])
