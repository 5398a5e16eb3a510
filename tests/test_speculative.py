"""Speculative decoding with the MTP draft: the rejection sampler, and exactness to plain decoding.

Two layers (CSA ratio 4 with its indexer, HCA ratio 128) and the 128-token window:
prompts of 5, 61 and 130 tokens decoded 320 tokens further cross 4-groups at every
phase, the 128-groups at 128, 256 and 384, and the window many times over.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.compressor import EMPTY_SCORE
from v4jax.config import ModelConfig
from v4jax.generate import Generator
from v4jax.model import Transformer
from v4jax.sampling import Sampling
from v4jax.speculative import accept_or_resample, may_draft

RAW = json.load(open("configs/tiny.json"))
PROMPT_LENS = (5, 130, 61)
NEW = 320
MAX_LEN = max(PROMPT_LENS) + NEW + 2


# ---------------------------------------------------------------------------- the rejection sampler
V = 6
DRAWS = 200_000


def chi_square(tokens, p):
    counts = np.bincount(tokens, minlength=len(p))
    expected = p * len(tokens)
    return float(((counts - expected) ** 2 / expected).sum())


def speculative_draws(p, q, seed, residual_from_p=False):
    """DRAWS independent speculative draws of one token: draft ~ q, then accept or resample."""
    keys = jax.random.split(jax.random.key(seed), (3, DRAWS))
    pb, qb = jnp.broadcast_to(p, (DRAWS, V)), jnp.broadcast_to(q, (DRAWS, V))
    draft = jax.vmap(jax.random.categorical)(keys[0], jnp.log(qb)).astype(jnp.int32)
    # the wrong rule: after a rejection, draw from p itself instead of the residual
    accepted, token = accept_or_resample(pb, pb if residual_from_p else qb, draft, keys[1], keys[2])
    if residual_from_p:  # accept as the right rule does, resample from p
        accepted_right, _ = accept_or_resample(pb, qb, draft, keys[1], keys[2])
        token = jnp.where(accepted_right, draft, token)
    return np.asarray(token), float(np.mean(np.asarray(accepted)))


def test_rejection_sampling_follows_the_target_distribution_and_a_wrong_rule_does_not():
    p = np.array([0.05, 0.4, 0.25, 0.15, 0.1, 0.05], np.float32)
    q = np.array([0.3, 0.1, 0.1, 0.2, 0.0, 0.3], np.float32)  # q misses token 4 entirely
    # 5 degrees of freedom: P(chi2 > 25) ~ 1.4e-4 for the right rule; the wrong one lands far above.
    tokens, acceptance = speculative_draws(jnp.asarray(p), jnp.asarray(q), 0)
    assert chi_square(tokens, p) < 25
    np.testing.assert_allclose(acceptance, np.minimum(p, q).sum(), atol=0.005)  # P(accept) = sum min(p, q)
    wrong, _ = speculative_draws(jnp.asarray(p), jnp.asarray(q), 0, residual_from_p=True)
    assert chi_square(wrong, p) > 1000
    # keeping every draft gives q, not p
    assert chi_square(np.asarray(jax.random.categorical(jax.random.key(1), jnp.log(jnp.asarray(q)), shape=(DRAWS,))),
                      p + 1e-9) > 1000


# ---------------------------------------------------------------------------- exactness
@pytest.fixture(scope="module")
def model():
    raw = dict(RAW, num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    return Transformer(ModelConfig.from_dict(raw, dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def prompts():
    ids = np.asarray(jax.random.randint(jax.random.key(3), (3, max(PROMPT_LENS)), 2, RAW["vocab_size"]))
    return [list(map(int, ids[b, :n])) for b, n in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="module")
def plain(model):
    return Generator(model, batch_size=3, max_len=MAX_LEN, prefill_chunk=128, min_bucket=128)


@pytest.fixture(scope="module")
def spec(model):
    return Generator(model, batch_size=3, max_len=MAX_LEN, prefill_chunk=128, min_bucket=128, speculative=True)


@pytest.fixture(scope="module")
def reference(plain, prompts):
    out = plain.generate(prompts, max_new_tokens=NEW + 1, sampling=Sampling(temperature=0))
    return [s.tokens for s in out.sequences]


def verify_run(spec, model, prompts, reference, stop_at):
    """Drive spec.verify by hand: prompts in chunks, then per step the pending token and a
    teacher-forced draft, right or wrong at random, so the accept and the reject path (with its
    rollback) both run at every phase. Rows stop at position stop_at[b].
    Returns (kept tokens per row, positions, state, set of (accepted, draft position mod 4))."""
    rng = np.random.default_rng(0)
    controls = spec.controls(Sampling(temperature=0))
    vocab = model.cfg.vocab_size
    state = spec.new_state()
    fed = np.zeros(3, np.int32)
    out = [[] for _ in range(3)]
    pending = np.zeros(3, np.int32)
    outcomes = set()
    while (fed < stop_at).any():
        ids = np.zeros((3, 128 if (fed < PROMPT_LENS).any() else 2), np.int32)
        n, drafted, follow = np.zeros(3, np.int32), np.zeros(3, bool), np.full(3, -1, np.int32)
        draft = np.zeros(3, np.int32)
        for b, p in enumerate(prompts):
            if fed[b] < len(p):
                n[b] = min(len(p) - fed[b], 128)
                ids[b, :n[b]] = p[fed[b]:fed[b] + n[b]]
                follow[b] = p[fed[b] + n[b]] if fed[b] + n[b] < len(p) else -1
            elif fed[b] < stop_at[b]:
                drafted[b] = may_draft(model.cfg, int(fed[b]), MAX_LEN) and fed[b] + 1 < stop_at[b]
                right = reference[b][len(out[b])]
                draft[b] = right if rng.random() < 0.5 else (right + 1 + rng.integers(vocab - 1)) % vocab
                n[b] = 1 + drafted[b]
                ids[b, :n[b]] = [pending[b], draft[b]][:n[b]]
        token, accepted, _, _, state = spec.verify(state, ids, n, drafted, follow, jax.nn.one_hot(draft, vocab),
                                                   controls)
        for b in range(3):
            mid_prompt = fed[b] + n[b] < len(prompts[b])
            if drafted[b]:
                outcomes.add((bool(accepted[b]), int(fed[b] + 1) % 4))
                assert bool(accepted[b]) == (draft[b] == reference[b][len(out[b])])
                if accepted[b]:
                    out[b].append(int(draft[b]))
            fed[b] += n[b] - (drafted[b] and not accepted[b])
            if n[b] and not mid_prompt:
                out[b].append(int(token[b]))
                pending[b] = token[b]
    return out, fed, state, outcomes


def plain_state(gen, prompts, tokens, pos):
    """Plain decoding's state (prefill, then one token per step) after each row's prompt + tokens up to pos[b]."""
    controls = gen.controls(Sampling(temperature=0))
    _, _, state = gen.prefill(gen.new_state(), prompts, controls)
    fed = np.array([len(p) for p in prompts])
    while (fed < pos).any():
        active = fed < pos
        step = [tokens[b][fed[b] - len(prompts[b])] if active[b] else 0 for b in range(3)]
        _, _, state = gen.decode(state, np.array(step), active, controls)
        fed += active
    return state


def assert_same_cache(got, want, where):
    """Equal up to float32 rounding (the tokens went through 2-token chunks here, 1-token steps there):
    empty score slots (EMPTY_SCORE) and never-written rows (0) exactly where plain decoding has them,
    every other value within 1e-5 of the array's scale. A stale draft (an O(1) value) cannot pass."""
    got, want = np.asarray(got), np.asarray(want)
    for special in (EMPTY_SCORE, 0.0):
        np.testing.assert_array_equal(got == special, want == special, err_msg=f"{where}: {special} slots")
    real = (want != EMPTY_SCORE)
    np.testing.assert_allclose(got[real], want[real], rtol=0, atol=1e-5 * np.abs(want[real]).max(), err_msg=where)


@pytest.mark.slow
def test_verify_steps_give_plain_greedy_tokens_and_leave_the_plain_state(spec, plain, model, prompts, reference):
    """Speculative steps keep plain greedy's tokens, and leave every array of the state (window rings,
    compressor carries, compressed entries, indexer keys) as plain decoding of the same tokens does;
    the MTP window matches a whole-sequence forward with the MTP block."""
    stop_at = np.array(PROMPT_LENS) + NEW
    out, fed, state, outcomes = verify_run(spec, model, prompts, reference, stop_at)
    assert len(outcomes) == 8  # accepted and rejected at every phase of a 4-group
    np.testing.assert_array_equal(fed, stop_at)
    for b in range(3):
        assert out[b] == reference[b][:len(out[b])] and len(out[b]) == NEW + 1

    want = plain_state(plain, prompts, reference, fed)
    np.testing.assert_array_equal(np.asarray(state["pos"]), np.asarray(want["pos"]))
    got_leaves = jax.tree_util.tree_leaves_with_path(state["layers"])
    for (path, got), exp in zip(got_leaves, jax.tree_util.tree_leaves(want["layers"])):
        assert_same_cache(got, exp, jax.tree_util.keystr(path))

    # MTP window: position t holds the MTP block's KV of (main streams at t, token t + 1)
    seqs = np.zeros((3, int(fed.max()) + 1), np.int32)
    for b, p in enumerate(prompts):
        seqs[b, :fed[b] + 1] = (p + out[b])[:fed[b] + 1]
    run = nnx.jit(lambda m, x, n: m.forward(x, None, n, mtp=True)[2]["mtp"]["window"])
    ring = np.asarray(run(model, jnp.asarray(seqs), jnp.asarray(fed)))
    got = np.asarray(state["mtp"]["window"])
    for b in range(3):
        np.testing.assert_allclose(got[b], ring[b], rtol=0, atol=2e-5 * np.abs(ring[b]).max())


@pytest.mark.slow
def test_speculative_generation_is_plain_greedy_and_compiles_once_per_width(spec, prompts, reference):
    out = spec.generate(prompts, max_new_tokens=NEW, sampling=Sampling(temperature=0))
    for b, seq in enumerate(out.sequences):
        assert seq.tokens == reference[b][:NEW] and seq.finish_reason == "length"
        assert seq.drafted > NEW // 2  # almost every step verified a draft
    # width 128 (first chunks; later ones on their own row), 2 (a verify step beside a chunk), the verify loop
    assert spec.compiled_shapes() == 4


def test_speculative_sampling_is_reproducible_and_follows_the_seed(spec, prompts):
    kwargs = dict(max_new_tokens=12, sampling=Sampling(temperature=1.0, top_k=20))
    a = spec.generate(prompts, seed=3, **kwargs)
    b = spec.generate(prompts, seed=3, **kwargs)
    c = spec.generate(prompts, seed=4, **kwargs)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    assert all(len(s.tokens) == 12 for s in a.sequences)
