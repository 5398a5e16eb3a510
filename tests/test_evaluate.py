"""Evaluation scores equal sums computed directly from the model's logits."""

import numpy as np
import pytest
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.errors import DataError
from v4jax.evaluate import loglikelihood, perplexity, rolling_windows
from v4jax.model import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))


forward = nnx.jit(lambda m, ids: m(ids))


def direct_logprobs(model, tokens):
    logits = np.asarray(forward(model, np.asarray([tokens], np.int32)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return np.array([logp[t - 1, tokens[t]] for t in range(1, len(tokens))]), logits


def test_loglikelihood_matches_direct_sum_over_continuation(model):
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, 512, n).tolist(), rng.integers(0, 512, k).tolist()) for n, k in [(5, 3), (20, 1), (9, 7)]]
    scores = loglikelihood(model, requests, batch_size=8)
    for (ctx, cont), score in zip(requests, scores):
        lp, logits = direct_logprobs(model, ctx + cont)
        np.testing.assert_allclose(score.loglikelihood, lp[len(ctx) - 1:].sum(), rtol=1e-5)
        greedy = all(logits[t - 1].argmax() == (ctx + cont)[t] for t in range(len(ctx), len(ctx) + len(cont)))
        assert score.is_greedy == greedy and score.n_tokens == len(cont)


def test_greedy_continuation_is_flagged_greedy(model):
    ctx = [3, 14, 15, 92]
    nxt = int(np.asarray(forward(model, np.asarray([ctx], np.int32)))[0, -1].argmax())
    assert loglikelihood(model, [(ctx, [nxt])], batch_size=8)[0].is_greedy


def test_rolling_windows_score_every_token_once_with_bounded_context():
    tokens = list(range(23))
    windows = rolling_windows(tokens, 8)
    scored = [w[a:b] for w, (a, b) in windows]
    assert [t for s in scored for t in s] == tokens[1:]
    assert all(len(w) <= 8 for w, _ in windows)


def test_perplexity_equals_exp_mean_nll(model):
    doc = np.random.default_rng(1).integers(0, 512, 40).tolist()
    result = perplexity(model, [doc], max_len=64)
    lp, _ = direct_logprobs(model, doc)
    np.testing.assert_allclose(result["perplexity"], np.exp(-lp.mean()), rtol=1e-5)
    assert result["tokens"] == 39


def test_bad_ids_lengths_and_sizes_are_refused_before_scoring(model):
    with pytest.raises(DataError, match=r"^document 1: token id 512 \(position 0\) is outside the vocabulary"):
        perplexity(model, [[1, 2], [512]], max_len=8)
    for bad in (1, 0):  # 1 never advanced (an endless loop), 0 grew memory without bound
        with pytest.raises(ValueError, match=f"max_len must be >= 2 .*got {bad}"):
            perplexity(model, [[1, 2, 3]], max_len=bad)
    with pytest.raises(DataError, match=r"^request 0: token id -3 \(position 1\)"):
        loglikelihood(model, [([1], [-3])])
    with pytest.raises(DataError, match=r"^request 1: 5 tokens; at most 4 fit$"):
        loglikelihood(model, [([1], [2]), ([1, 2, 3], [4, 5])], max_len=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        loglikelihood(model, [([1], [2])], batch_size=0)
