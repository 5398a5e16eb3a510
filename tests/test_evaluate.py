"""Evaluation scores equal sums computed directly from the model's logits and from the numpy oracle's."""

import json

import numpy as np
import pytest
from flax import nnx

import oracle
from v4jax import cli, evaluate
from v4jax.cli.eval import partial_path
from v4jax.config import ModelConfig
from v4jax.errors import DataError
from v4jax.evaluate import (
    Batch,
    Window,
    continuation_window,
    document_windows,
    loglikelihood,
    padded_fraction,
    perplexity,
    plan_batches,
    rolling_windows,
    score,
)
from v4jax.model import Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))


forward = nnx.jit(lambda m, ids: m(ids))


def direct_logprobs(model, tokens):
    logits = np.asarray(forward(model, np.asarray([tokens], np.int32)), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return np.array([logp[t - 1, tokens[t]] for t in range(1, len(tokens))]), logits


@pytest.mark.slow
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
    with pytest.raises(DataError, match=r"^row 0: token id -3 \(position 1\)"):
        loglikelihood(model, [([1], [-3])])
    with pytest.raises(DataError, match=r"^request 1: 5 tokens; at most 4 fit$"):
        loglikelihood(model, [([1], [2]), ([1, 2, 3], [4, 5])], max_len=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        loglikelihood(model, [([1], [2])], batch_size=0)


# ---------------------------------------------------------------------------- against the numpy oracle
RAW2 = {**json.load(open("configs/tiny.json")), "num_hidden_layers": 2, "compress_ratios": [4, 128, 0],
        "num_hash_layers": 1}
MAX_LEN = 24


@pytest.fixture(scope="module")
def small():
    """(model, oracle params): a randomised two-layer fp32 model (CSA, HCA and window-only layers)."""
    from test_model import oracle_params, randomize

    m = Transformer(ModelConfig.from_dict(RAW2, dtype="float32", quant_sim=False), rngs=nnx.Rngs(3))
    randomize(m, seed=3)
    return m, oracle_params(m)


def oracle_logp(params, tokens):
    """log p(tokens[t] | tokens[:t]) for t >= 1, float64, from the oracle's logits of one forward."""
    logits = oracle.forward(RAW2, params, np.asarray([tokens]))["logits"][0]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.array([logp[t - 1, tokens[t]] for t in range(1, len(tokens))])


def expected_document(params, doc):
    """Windows of MAX_LEN scoring MAX_LEN - 1 new tokens each, their context the tokens just before."""
    out = []
    for first in range(1, len(doc), MAX_LEN - 1):
        last = min(first + MAX_LEN - 1, len(doc))
        window = doc[max(0, last - MAX_LEN):last]
        out.append(oracle_logp(params, window)[-(last - first):])
    return np.concatenate(out)


def test_scores_match_the_oracle_whatever_the_batching(small):
    """Documents shorter and longer than max_len and (context, continuation) pairs (one whose context
    must lose its oldest tokens) scored in mixed-length batches, and again one window per batch
    (the other rows padding):
    every row equals the oracle's log-softmax sum, so padding and batch composition change nothing."""
    model, params = small
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 512, n).tolist() for n in (7, 50, 19, 2, 24)]
    pairs = [(rng.integers(0, 512, n).tolist(), rng.integers(0, 512, k).tolist()) for n, k in ((3, 2), (30, 4), (9, 9))]
    windows = [w for i, d in enumerate(docs) for w in document_windows(i, d, MAX_LEN)]
    windows += [continuation_window(len(docs) + i, c, k, MAX_LEN) for i, (c, k) in enumerate(pairs)]
    mixed = plan_batches(windows, multiple=2, token_budget=64)  # width 16: 4 rows, width 32: 2 rows
    assert {(b.rows, b.width) for b in mixed} == {(4, 16), (2, 32)} and any(len(b.windows) < b.rows for b in mixed)
    assert 0 < padded_fraction(mixed) < 1
    got = dict(score(model, windows, mixed))
    # each window alone in a batch of the same shape (the same compiled programs), the rest padding
    shape = {w: (b.rows, b.width) for b in mixed for w in b.windows}
    alone = dict(score(model, windows, [Batch((w,), *shape[w]) for w in windows]))
    assert sorted(got) == sorted(alone) == list(range(len(docs) + len(pairs)))
    for i, doc in enumerate(docs):
        want = expected_document(params, doc)
        np.testing.assert_allclose(got[i].logprobs, want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[i].loglikelihood, want.sum(), rtol=1e-5)
        assert got[i].n_tokens == len(doc) - 1
    for j, (ctx, cont) in enumerate(pairs):
        seq = (ctx + cont)[-MAX_LEN:]
        want = oracle_logp(params, seq)[-len(cont):]
        np.testing.assert_allclose(got[len(docs) + j].loglikelihood, want.sum(), rtol=1e-5)
        assert got[len(docs) + j].n_tokens == len(cont)
    for row in got:
        np.testing.assert_allclose(alone[row].logprobs, got[row].logprobs, rtol=1e-5, atol=1e-6)
        assert alone[row].is_greedy == got[row].is_greedy


def test_buckets_hold_little_padding_and_fill_the_data_parallel_size():
    lengths = [3, 17, 18, 30, 31, 32, 33, 60, 64, 64, 100]
    windows = [Window(i, tuple(range(n)), 1, n) for i, n in enumerate(lengths)]
    batches = plan_batches(windows, multiple=2, token_budget=128)
    for b in batches:
        assert b.rows % 2 == 0 and all(b.width // 2 < len(w.tokens) <= b.width or b.width == 16 for w in b.windows)
    assert sorted(w.row for b in batches for w in b.windows) == list(range(len(lengths)))
    real = sum(lengths)
    assert np.isclose(padded_fraction(batches), 1 - real / sum(b.rows * b.width for b in batches))
    with pytest.raises(ValueError, match="batch_size must be a positive multiple of 2, got 3"):
        plan_batches(windows, batch_size=3, multiple=2)


# ---------------------------------------------------------------------------- resuming a killed run
class Killed(Exception):
    """Stands for SIGKILL: nothing after the raising batch reaches the disk."""


def test_a_run_killed_inside_a_long_document_keeps_its_scored_windows(word_ckpt, tmp_path, capsys, monkeypatch):
    """A 60-token document scored as windows of 16 (four windows, one per batch) and a short one:
    a run killed during the third batch leaves the first two windows in the partial file and no
    row; the rerun scores only the other three windows and writes, row for row and byte for byte,
    the file an uninterrupted run writes, then drops the partial file. A partial line that is not
    a window of the data is refused naming file:line."""
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"ids": list(range(3, 63))}) + "\n" + json.dumps({"ids": [7, 8, 9]}) + "\n")
    argv = ["eval", "--ckpt", str(word_ckpt), "--data", str(data), "--max-len", "16", "--batch", "1",
            "--dtype", "float32", "--no-quant-sim", "--logprobs"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    cli.main([*argv, "--out", str(full)])
    capsys.readouterr()
    scored = []
    score_batch = evaluate.score_batch

    def dies_in_third(model, batch, *args):
        if len(scored) == 2:
            raise Killed
        scored.append([(w.row, w.part) for w in batch.windows])
        return score_batch(model, batch, *args)

    monkeypatch.setattr(evaluate, "score_batch", dies_in_third)
    with pytest.raises(Killed):
        cli.main([*argv, "--out", str(part)])
    assert part.read_text() == ""
    lines = partial_path(part).read_text().splitlines()
    assert [(r["row"], r["part"], len(r["logprobs"])) for r in map(json.loads, lines)] == [(0, 0, 15), (0, 1, 15)]
    scored.clear()
    monkeypatch.setattr(evaluate, "score_batch", lambda m, b, *a: scored.append(b.windows) or score_batch(m, b, *a))
    cli.main([*argv, "--out", str(part)])
    assert json.loads(capsys.readouterr().out)["rows_scored"] == 2
    assert sorted((w.row, w.part) for ws in scored for w in ws) == [(0, 2), (0, 3), (1, 0)]
    assert part.read_text() == full.read_text() and not partial_path(part).exists()

    partial_path(part).write_text(json.dumps({"row": 0, "part": 9, "logprobs": [0.0], "is_greedy": False}) + "\n")
    part.write_text("")
    with pytest.raises(SystemExit):
        cli.main([*argv, "--out", str(part)])
    assert "part.jsonl.partial:1: not a window of this data (row 0, part 9)" in capsys.readouterr().err
