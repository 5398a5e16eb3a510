"""Sampling (greedy, temperature, top-k, top-p, seeds) and the generation loop (stop tokens, budgets, streaming)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.errors import DataError
from v4jax.generate import DECODE_STEPS, Generator, Request
from v4jax.model import Transformer
from v4jax.sampling import Sampling, filter_logits, sample, sequence_keys, token_keys

VOCAB = 64
DRAWS = 4000


@pytest.fixture(scope="module")
def logits():
    return jax.random.normal(jax.random.key(0), (3, VOCAB)) * 2.0


@jax.jit
def draw_many(logits, keys, temperature, top_k, top_p):
    """[draws] keys -> [draws, batch] tokens, every draw with the same settings per row."""
    return jax.vmap(lambda k: sample(logits, jax.random.split(k, logits.shape[0]), temperature, top_k, top_p))(keys)


def settings(temperature, top_k, top_p, batch=3):
    return (jnp.full((batch,), temperature, jnp.float32), jnp.full((batch,), top_k, jnp.int32),
            jnp.full((batch,), top_p, jnp.float32))


def draws(logits, seed, *args):
    return np.asarray(draw_many(logits, jax.random.split(jax.random.key(seed), DRAWS), *settings(*args)))


def test_greedy_is_argmax(logits):
    tokens = draws(logits, 0, 0.0, 0, 1.0)
    assert (tokens == np.asarray(jnp.argmax(logits, -1))).all()


def test_top_k_never_picks_outside_the_k_best(logits):
    tokens = draws(logits, 1, 5.0, 4, 1.0)  # a hot temperature spreads the draws over all k
    best = np.argsort(-np.asarray(logits), axis=-1)[:, :4]
    for b in range(3):
        assert set(tokens[:, b]) == set(best[b])


def test_top_p_keeps_the_smallest_set_reaching_p_and_samples_it_in_proportion(logits):
    p = 0.7
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.zeros(3, jnp.int32), jnp.full(3, p))))
    probs = np.asarray(jax.nn.softmax(logits, -1))
    tokens = draws(logits, 2, 1.0, 0, p)
    for b in range(3):
        mass = np.sort(probs[b][kept[b]])
        assert mass.sum() >= p > mass.sum() - mass[0]  # reaches p; without its least token it would not
        assert (probs[b][kept[b]].min() >= probs[b][~kept[b]]).all()  # the set is the most probable tokens
        assert set(tokens[:, b]) <= set(np.flatnonzero(kept[b]))
        freq = np.bincount(tokens[:, b], minlength=VOCAB)[kept[b]] / DRAWS
        np.testing.assert_allclose(freq, probs[b][kept[b]] / mass.sum(), atol=0.03)


def test_temperature_sampling_follows_the_softmax(logits):
    tokens = draws(logits, 3, 2.0, 0, 1.0)
    probs = np.asarray(jax.nn.softmax(logits / 2.0, -1))
    for b in range(3):
        np.testing.assert_allclose(np.bincount(tokens[:, b], minlength=VOCAB) / DRAWS, probs[b], atol=0.03)


def test_top_k_and_top_p_combine(logits):
    kept = np.isfinite(np.asarray(filter_logits(logits, jnp.full(3, 10, jnp.int32), jnp.full(3, 0.999))))
    assert (kept.sum(-1) == 10).all()


def test_same_seed_same_tokens_and_keys_depend_on_request_and_position(logits):
    np.testing.assert_array_equal(draws(logits, 7, 1.0, 0, 0.9), draws(logits, 7, 1.0, 0, 0.9))
    assert not np.array_equal(draws(logits, 7, 1.0, 0, 0.9), draws(logits, 8, 1.0, 0, 0.9))
    keys = sequence_keys(5, np.arange(4))
    data = np.asarray(jax.random.key_data(token_keys(keys, jnp.array([3, 3, 4, 4]))))
    np.testing.assert_array_equal(data[1], np.asarray(jax.random.key_data(token_keys(sequence_keys(5, [1]),
                                                                                    jnp.array([3]))))[0])
    assert len({d.tobytes() for d in data}) == 4


def test_sampling_settings_are_checked():
    for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


# ---------------------------------------------------------------------------- the generation loop
@pytest.fixture(scope="module")
def model():
    """Two layers (CSA, HCA) keep the compiles short; sampling needs no depth. Its variables are
    committed to the device, as a loaded checkpoint's are (the compile counts below then also show
    that fresh decode states do not key second programs)."""
    raw = json.load(open("configs/tiny.json"))
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    model = Transformer(ModelConfig.from_dict(raw, dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))
    return model


@pytest.fixture(scope="module")
def gen(model):
    return Generator(model, batch_size=2, max_len=64, prefill_chunk=16)


PROMPTS = [[0, 5, 9, 200, 17, 3], [0, 44, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]


def test_greedy_generation_is_the_argmax_of_a_full_forward(gen, model):
    out = gen.generate(PROMPTS, max_new_tokens=12, sampling=Sampling(temperature=0))
    assert len(out.sequences) == 3 and out.new_tokens == 36 and out.prompt_tokens == 20
    ids = np.zeros((3, 32), np.int32)  # right padding: the model is causal
    for b, (prompt, seq) in enumerate(zip(PROMPTS, out.sequences)):
        ids[b, :len(prompt) + 12] = prompt + seq.tokens
    full = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))
    for b, (prompt, seq) in enumerate(zip(PROMPTS, out.sequences)):
        assert seq.finish_reason == "length" and len(seq.tokens) == 12
        np.testing.assert_array_equal(full[b, len(prompt) - 1:len(prompt) + 11].argmax(-1), seq.tokens)


def test_decode_loop_ends_rows_at_their_budget_or_stop_token_and_halts_at_the_first_end(gen, model):
    """decode_steps runs several greedy steps in one dispatch: each row draws the argmax continuation
    (of full forwards here) until its budget or a stop token (drawn, then the row idles: -1); with halt it
    returns after the first step that ends a row, without it when every row has ended."""
    prompts = PROMPTS[:2]
    forward = nnx.jit(lambda m, x: m(x))
    ids = np.zeros((2, 24), np.int32)
    ref = [[], []]
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    for k in range(11):
        full = np.asarray(forward(model, jnp.asarray(ids)))
        for b, p in enumerate(prompts):
            ref[b].append(int(full[b, len(p) + k - 1].argmax()))
            ids[b, len(p) + k] = ref[b][-1]
    controls = gen.controls(Sampling(temperature=0))
    first, _, state = gen.prefill(gen.new_state(), prompts, controls)
    assert list(first) == [ref[0][0], ref[1][0]]
    drawn, state = gen.decode_steps(state, first, np.array([3, 9]), controls, halt=True)
    np.testing.assert_array_equal(drawn, [ref[0][1:4], ref[1][1:4]])  # row 0's budget ended it: halt
    stop = ref[1][7]
    cut = ref[1][4:].index(stop)
    stops = np.zeros((2, model.cfg.vocab_size), bool)
    stops[1, stop] = True
    drawn, state = gen.decode_steps(state, drawn[:, -1], np.array([0, 6]), controls, stops)
    np.testing.assert_array_equal(drawn, [[-1] * (cut + 1), ref[1][4:5 + cut]])  # row 1 drew its stop token
    assert list(np.asarray(state["pos"])) == [len(prompts[0]) + 3, len(prompts[1]) + 4 + cut]  # stop: not fed
    with pytest.raises(ValueError, match="steps must be in"):
        gen.decode_steps(state, drawn[:, -1], np.array([1, 1]), controls, steps=DECODE_STEPS + 1)


def test_same_seed_same_completions_and_streaming_matches(gen):
    streamed = {}
    kwargs = dict(max_new_tokens=10, sampling=Sampling(temperature=1.0, top_k=20, top_p=0.9))
    a = gen.generate(PROMPTS, seed=11, on_token=lambda i, t: streamed.setdefault(i, []).append(t), **kwargs)
    b = gen.generate(PROMPTS, seed=11, **kwargs)
    c = gen.generate(PROMPTS, seed=12, **kwargs)
    assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
    assert [s.tokens for s in a.sequences] != [s.tokens for s in c.sequences]
    assert [streamed[i] for i in range(3)] == [s.tokens for s in a.sequences]


def test_stop_token_ends_only_its_sequence(gen):
    free = gen.generate(PROMPTS[:2], max_new_tokens=10, sampling=Sampling(temperature=0)).sequences
    stop = free[0].tokens[3]
    cut = gen.generate(PROMPTS[:2], max_new_tokens=10, sampling=Sampling(temperature=0), stop_tokens=[stop]).sequences
    for f, c in zip(free, cut):
        if stop in f.tokens:
            assert c.finish_reason == "stop" and c.tokens == f.tokens[:f.tokens.index(stop)]
        else:
            assert c.finish_reason == "length" and c.tokens == f.tokens
    assert cut[0].finish_reason == "stop" and len(cut[0].tokens) <= 3


def test_generation_stops_at_max_len_and_rejects_prompts_that_do_not_fit(gen):
    out = gen.generate([list(range(60)), [1, 2]], max_new_tokens=8, sampling=Sampling(temperature=0))
    assert [len(s.tokens) for s in out.sequences] == [5, 8]  # 60 prompt tokens + 4 fed back = max_len 64
    with pytest.raises(ValueError, match="prompt 0 has 65 tokens"):
        gen.generate([list(range(65))], max_new_tokens=1)
    with pytest.raises(ValueError, match="prompt 1 has 0 tokens"):
        gen.generate([[1], []], max_new_tokens=1)
    # width 16 for the first chunks of both, 16 for row 0's later chunks on its own (batch-1 program), 1 (decode)
    assert gen.compiled_shapes() == 3


def test_continuous_batching_gives_each_request_what_it_gets_alone(gen):
    """Five requests through two slots: prompts of 3 to 40 tokens (up to three prefill chunks, fed while
    the other slot decodes), budgets of 3 to 20 tokens, one sampled, one with its own stop token. Each
    completion is that request's generated alone; short ones come back first; no program per request."""
    greedy = Sampling(temperature=0)
    rng = np.random.default_rng(0)
    prompts = [list(map(int, rng.integers(2, 512, n))) for n in (20, 3, 40, 7, 33)]
    budgets = [12, 3, 20, 5, 9]
    alone = [gen.generate([p], n, greedy).sequences[0] for p, n in zip(prompts, budgets)]
    hot = Sampling(temperature=1.0, top_k=30)
    alone[3] = gen.generate([prompts[3]], budgets[3], hot, seed=5).sequences[0]
    stop = alone[4].tokens[4]
    requests = [Request(p, n, greedy) for p, n in zip(prompts, budgets)]
    requests[3] = Request(prompts[3], budgets[3], hot, seed=5)
    requests[4] = Request(prompts[4], budgets[4], greedy, frozenset([stop]))
    order, got = [], {}
    for i, completion in gen.serve(iter(requests)):
        order.append(i)
        got[i] = completion
    assert order != sorted(order) and order[0] == 1  # the 3-token request finishes first
    for i in range(4):
        assert got[i].tokens == alone[i].tokens and got[i].finish_reason == "length"
    cut = alone[4].tokens.index(stop)
    assert got[4].tokens == alone[4].tokens[:cut] and got[4].finish_reason == "stop"
    assert gen.compiled_shapes() == 3  # shared first chunks, one slot's chunks alone, decode: width 16, 16, 1


def test_a_stop_string_ends_its_sequence_as_soon_as_it_appears_and_frees_the_slot(gen):
    """Three greedy requests through two slots; the first stops at a stop string (StopStrings over a
    word-level tokenizer): it ends at the first token whose text holds the string, its text cut
    there is the full output's cut, and the third request, served in the freed slot, is unchanged."""
    from tokenizers import Tokenizer, models

    from v4jax.generate import StopStrings

    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    greedy = Sampling(temperature=0)
    full = gen.generate(PROMPTS, max_new_tokens=12, sampling=greedy).sequences
    words = [f"w{t}" for t in full[0].tokens]
    stop = words[5] + " " + words[6]  # two tokens' text, so the check spans steps
    first = next(k for k in range(1, 13) if stop in " ".join(words[:k]))
    requests = [Request(p, 12, greedy) for p in PROMPTS]
    requests[0] = Request(PROMPTS[0], 12, greedy, until=StopStrings(tokenizer, ["never", stop]))
    order, got = [], {}
    for i, completion in gen.serve(requests):
        order.append(i)
        got[i] = completion
    assert got[0].finish_reason == "stop" and got[0].tokens == full[0].tokens[:first] and first < 12
    assert tokenizer.decode(got[0].tokens).split(stop)[0] == " ".join(words).split(stop)[0]
    assert order[0] == 0 and [got[i].tokens for i in (1, 2)] == [full[1].tokens, full[2].tokens]

def test_prompts_are_checked_before_any_step_runs(model):
    gen = Generator(model, batch_size=2, max_len=64, prefill_chunk=16)
    with pytest.raises(DataError, match=r"^prompt 1: token id 600 \(position 2\) is outside the vocabulary \[0, 512\)$"):
        gen.generate([[1, 2], [3, 4, 600], [70000000000000000000000]], max_new_tokens=4)
    with pytest.raises(DataError, match=r"^prompt 0: token id -1 \(position 0\)"):
        gen.generate([[-1]], max_new_tokens=4)
    with pytest.raises(DataError, match=r"^prompt 1 has 65 tokens; need 1 \.\. max_len = 64$"):
        gen.generate([[1], [2] * 65], max_new_tokens=4)
    assert gen.compiled_shapes() == 0  # nothing was compiled, let alone run


def test_stop_tokens_come_from_generation_config_then_config_and_bad_files_are_named(tmp_path):
    from v4jax.errors import CheckpointError
    from v4jax.generate import stop_tokens_of

    assert stop_tokens_of(tmp_path) == []
    (tmp_path / "config.json").write_text('{"eos_token_id": 1}')
    assert stop_tokens_of(tmp_path) == [1]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [1, 7]}')
    assert stop_tokens_of(tmp_path) == [1, 7]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": "</s>"}')
    with pytest.raises(CheckpointError, match=r'generation_config\.json: eos_token_id must be a token id or a list '
                                              r'of them, got "</s>"$'):
        stop_tokens_of(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": ')
    with pytest.raises(CheckpointError, match=r"generation_config\.json: not a JSON file: "):
        stop_tokens_of(tmp_path)
    # read as every checkpoint JSON file is: a key given twice is refused, not resolved silently
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 1, "eos_token_id": 2}')
    with pytest.raises(CheckpointError, match=r"generation_config\.json: not a JSON file: .*eos_token_id"):
        stop_tokens_of(tmp_path)


# ---------------------------------------------------------------------------- command line and demo
@pytest.mark.slow
def test_cli_generate_completes_a_batch_of_text_and_raw_ids(word_ckpt, capsys):
    from v4jax import cli

    cli.main(["generate", "--ckpt", str(word_ckpt), "--ids", "5,9,200", "--prompt", "w5 w9 w200", "--max-new-tokens", "6",
              "--temperature", "0"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("[0] w") and len(lines[0].split()) == 7
    assert lines[1] == lines[0].replace("[0]", "[1]")  # the text encodes to the same ids
    assert "tokens/s" in err and "bytes/token" in err

    # speculative, both prompts through one slot, as JSON: the same greedy completions
    cli.main(["generate", "--ckpt", str(word_ckpt), "--ids", "5,9,200", "--prompt", "w5 w9 w200", "--max-new-tokens", "6",
              "--temperature", "0", "--speculative", "mtp", "--batch-size", "1", "--json"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2 and rows[0] == rows[1]
    assert rows[0]["text"] == lines[0].removeprefix("[0] ") and rows[0]["tokens"] == [int(w[1:]) for w in
                                                                                      rows[0]["text"].split()]
    assert rows[0]["finish_reason"] == "length" and 0 <= rows[0]["accepted"] <= rows[0]["drafted"] <= 6
    assert "MTP drafts accepted" in err


def test_text_stream_holds_back_unfinished_utf8():
    from tokenizers import Tokenizer, decoders, models

    from v4jax.generate import TextStream

    # byte-level tokens: "é" is two tokens (0xC3 0xA9)
    vocab = {"a": 0, "Ã": 1, "©": 2}  # byte-level symbols of 'a', 0xC3, 0xA9
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tokenizer.decoder = decoders.ByteLevel()
    stream = TextStream(tokenizer)
    assert [stream.push(t) for t in (0, 1, 2, 0)] == ["a", "", "é", "a"]


@pytest.mark.slow
def test_demo_runs_the_whole_pipeline_on_eight_devices(tmp_path, capsys):
    from v4jax.cli.demo import run_demo

    figures = run_demo(tmp_path, max_new_tokens=8)
    assert "mesh of 8 simulated CPU devices" in capsys.readouterr().out
    assert figures["decode_tokens_per_second"] > 0 and 0 < figures["kv_bytes_per_token_1m"] < 1000
