"""Fine-tuning: loss goes down, only nnx.Param moves, save/resume continues exactly."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from orbax.checkpoint.experimental import v1 as ocp

from v4jax import load_pretrained, train
from v4jax.checkpoint import weights
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.optim import OptimizerConfig
from v4jax.runs import load_checkpoint


@pytest.mark.slow
def test_train_steps_reduce_loss_touch_only_params_and_resume_exactly(tmp_path):
    cfg = ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False, remat=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    before = weights.to_flat(model)
    opt = train.make_optimizer(model, OptimizerConfig(learning_rate=3e-3))
    ids = jax.random.randint(jax.random.key(0), (2, 64), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids)
    step = dict(mtp_weight=0.3, balance_weight=1e-4, bias_update_rate=1e-3)
    metrics = [train.train_step(model, opt, ids, mask, **step) for _ in range(3)]
    losses = [float(m["loss"]) for m in metrics]
    assert losses[2] < losses[0] - 1.0
    after = weights.to_flat(model)
    assert not np.array_equal(after["layers.2.attn.wq_a.weight"], before["layers.2.attn.wq_a.weight"])
    assert not np.array_equal(after["mtp.0.e_proj.weight"], before["mtp.0.e_proj.weight"])  # MTP loss reaches it
    np.testing.assert_array_equal(after["layers.0.ffn.gate.tid2eid"], before["layers.0.ffn.gate.tid2eid"])
    # The router bias moves by the aux-loss-free rule only: +-1e-3 (or 0) per step, never by gradients.
    moved = (np.asarray(after["layers.2.ffn.gate.bias"]) - np.asarray(before["layers.2.ffn.gate.bias"])) / 1e-3
    assert np.any(moved != 0) and np.allclose(moved, np.round(moved), atol=1e-3) and np.all(np.abs(moved) <= 3)
    assert all(float(m["max_expert_load"]) >= 1.0 and float(m["balance_loss"]) > 0 for m in metrics)

    checkpoints = train.Checkpoints(tmp_path / "ckpt")
    checkpoints.save(3, model, opt)
    expected = train.train_step(model, opt, ids, mask, **step)
    fresh = Transformer(cfg, rngs=nnx.Rngs(7))
    fresh_opt = train.make_optimizer(fresh, OptimizerConfig(learning_rate=3e-3))
    assert checkpoints.restore(fresh, fresh_opt) == 3
    resumed = train.train_step(fresh, fresh_opt, ids, mask, **step)
    assert float(resumed["loss"]) == float(expected["loss"])


def two_layer_config(**overrides) -> ModelConfig:
    """configs/tiny.json cut to two layers (CSA then HCA, the first hash-routed) and the MTP block."""
    raw = json.loads(open("configs/tiny.json").read())
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    return ModelConfig.from_dict(raw, dtype="float32", quant_sim=False, **overrides)


@pytest.mark.slow
def test_accumulated_micro_batches_equal_the_whole_batch_step_and_the_step_compiles_once():
    cfg = two_layer_config()
    ids = np.asarray(jax.random.randint(jax.random.key(1), (4, 32), 0, cfg.vocab_size))
    mask = np.ones_like(ids)
    mask[1, :20] = 0  # unequal target counts: each micro-batch's NLL must be divided by the whole batch's
    segments = np.ones_like(ids)
    segments[2, 16:] = 2  # a second document: its first token is nobody's target
    step = dict(mtp_weight=0.3, bias_update_rate=1e-3)
    runs = []
    for accum in (1, 2):
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        # eps = 1: AdamW's first step is lr * g / (|g| + eps), near linear in g, so round-off in a
        # near-zero gradient is not blown up to a whole lr step as with eps = 1e-8.
        opt = train.make_optimizer(model, OptimizerConfig(learning_rate=1.0, eps=1.0))
        metrics = train.train_step(model, opt, ids, mask, segments, grad_accum=accum, **step)
        runs.append((weights.to_flat(model), metrics))
    (whole, m1), (accumulated, m2) = runs
    init = weights.to_flat(Transformer(cfg, rngs=nnx.Rngs(0)))
    assert np.abs(np.asarray(whole["head.weight"]) - init["head.weight"]).max() > 1e-3
    for key in ("loss", "nll", "mtp_nll", "grad_norm", "max_expert_load"):
        np.testing.assert_allclose(float(m2[key]), float(m1[key]), rtol=2e-6, err_msg=key)
    for name, want in whole.items():
        step_want, step_got = np.asarray(want) - init[name], np.asarray(accumulated[name]) - init[name]
        # Steps agree to 1e-4 of their size and to the fp32 spacing of the weights, which differences inherit.
        np.testing.assert_allclose(step_got, step_want, rtol=0, atol=1e-4 * np.abs(step_want).max()
                                   + 2 * np.spacing(np.abs(init[name]).max()) + 1e-9, err_msg=name)
    # The router bias moved by the same whole-batch counts in both.
    np.testing.assert_array_equal(accumulated["layers.1.ffn.gate.bias"], whole["layers.1.ffn.gate.bias"])
    assert not np.array_equal(whole["layers.1.ffn.gate.bias"], np.zeros_like(whole["layers.1.ffn.gate.bias"]))

    # The NLL by hand (numpy log-softmax of the model's logits over the masked targets).
    fresh = Transformer(cfg, rngs=nnx.Rngs(0))
    logits = np.asarray(fresh(jnp.asarray(ids)), np.float64)
    # Row 2's documents each run alone (what packing guarantees: a document sees only itself).
    logits[2] = np.concatenate([np.asarray(fresh(jnp.asarray(ids[2:3, :16])))[0],
                                np.asarray(fresh(jnp.asarray(ids[2:3, 16:])))[0]])
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    target = mask[:, 1:] * (segments[:, 1:] == segments[:, :-1])
    picked = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(m1["nll"]), -(picked * target).sum() / target.sum(), rtol=1e-5)

    # Two more steps of the accumulated run reuse its program: one compile per step shape.
    before = train.train_step.jitted_fn._cache_size()
    for _ in range(2):
        metrics = train.train_step(model, opt, ids, mask, segments, grad_accum=2, **step)
    assert train.train_step.jitted_fn._cache_size() == before


def smallest_config() -> ModelConfig:
    """Still V4 (mHC, a hash-routed CSA layer with its indexer, an HCA layer, shared + routed experts),
    as small as it gets: dim 64, 4 experts, 3 Sinkhorn rounds (the unrolled 20 dominate the compile)."""
    raw = json.loads(open("configs/tiny.json").read())
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1, hidden_size=64,
               num_attention_heads=2, head_dim=80, qk_rope_head_dim=16, index_head_dim=32, index_n_heads=2,
               index_topk=4, o_lora_rank=32, q_lora_rank=32, moe_intermediate_size=32, n_routed_experts=4,
               vocab_size=128, hc_sinkhorn_iters=3)
    return ModelConfig.from_dict(raw, dtype="float32", quant_sim=False)


def test_a_tiny_model_learns_a_repetitive_corpus_within_a_minute_compiling_its_step_once():
    """The loss of a fresh model on a cycle of 10 tokens falls below a fifth of its start in 8 AdamW
    steps; the step compiles once (a fresh model's eagerly made variables are committed by
    make_optimizer); the per-layer expert loads come with every step."""
    cfg = smallest_config()
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = train.make_optimizer(model, OptimizerConfig(learning_rate=1e-2, total_steps=8))
    cycle = np.random.default_rng(0).permutation(cfg.vocab_size)[:10]
    ids = np.stack([np.roll(np.tile(cycle, 7), -shift)[:64] for shift in range(4)])  # [4, 64]
    compiled = train.train_step.jitted_fn._cache_size()
    metrics = [train.train_step(model, opt, ids, np.ones_like(ids), bias_update_rate=1e-3) for _ in range(8)]
    assert train.train_step.jitted_fn._cache_size() == compiled + 1
    losses = [float(m["loss"]) for m in metrics]
    assert losses[0] > 0.8 * np.log(cfg.vocab_size) and losses[-1] < 0.2 * losses[0], losses
    for m in metrics:
        top, low = np.asarray(m["expert_load_max"]), np.asarray(m["expert_load_min"])
        assert top.shape == low.shape == (2,) and np.all(top >= 1) and np.all(low <= 1)  # no MTP loss: 2 layers
        assert float(m["max_expert_load"]) == top.max()


def cli(args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "v4jax.cli", *args], env=env, capture_output=True, text=True,
                          timeout=1200, **kwargs)


def losses(run: Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_killed_run_reruns_to_the_uninterrupted_losses_and_the_run_folder_serves_every_verb(word_ckpt, tmp_path):
    """A run SIGKILLed at a random step and rerun gives every `loss` of the uninterrupted run bit for bit
    (model, optimiser, router biases and data position restored); that run compiles its step once and
    its loss falls; then generate, eval and export take the run folder as --ckpt."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{3 + (i + j) % 9}" for j in range(50 + 7 * i))}) + "\n"
                            for i in range(12)))
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_LOG_COMPILES": "1"}
    args = ["train", "--ckpt", str(word_ckpt), "--data", str(data), "--seq-len", "128", "--batch", "4",
            "--grad-accum", "2", "--steps", "8", "--save-every", "2", "--keep", "2", "--lr", "3e-3", "--warmup", "2",
            "--bias-update-rate", "1e-3", "--balance-weight", "1e-4", "--dtype", "float32", "--no-quant-sim",
            "--peak-tflops", "1"]
    full = cli([*args, "--out", str(tmp_path / "full")], env)
    assert full.returncode == 0, full.stderr[-2000:]
    assert full.stderr.count("Finished XLA compilation of jit(train_step)") == 1
    want = losses(tmp_path / "full")
    assert len(want) == 8 and want[-1] < want[0] - 1.0
    record = json.loads((tmp_path / "full" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record.keys() == {"step", "loss", "nll", "mtp_nll", "balance_loss", "lr", "grad_norm", "tokens_per_s",
                             "mfu", "max_expert_load", "expert_load_max", "expert_load_min"}
    assert record["step"] == 8 and record["max_expert_load"] >= 1 and record["mfu"] > 0
    assert len(record["expert_load_max"]) == len(record["expert_load_min"]) == 3  # two layers and the MTP block
    assert record["max_expert_load"] == max(record["expert_load_max"])
    assert sorted(p.name for p in (tmp_path / "full").iterdir() if p.name.isdigit()) == ["6", "8"]  # --keep 2

    run = tmp_path / "run"
    kill_at = random.Random().randint(2, 6)
    proc = subprocess.Popen([sys.executable, "-m", "v4jax.cli", *args, "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1200
    while proc.poll() is None and not ((run / "metrics.jsonl").exists() and len(losses(run)) >= kill_at):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    rerun = cli([*args, "--out", str(run)], env)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert losses(run) == want, f"killed after step {kill_at}"

    # The run folder wherever a checkpoint folder goes: its latest step, not the base weights.
    env.pop("JAX_LOG_COMPILES")
    scored = [cli(["eval", "--ckpt", str(ckpt), "--data", str(data), "--max-len", "128", "--dtype", "float32",
                   "--no-quant-sim"], env) for ckpt in (run, word_ckpt)]
    assert all(r.returncode == 0 for r in scored), scored[0].stderr[-2000:]
    trained, base = (json.loads(r.stderr.splitlines()[-1])["perplexity"] for r in scored)  # the summary line
    assert trained < base / 2
    generated = cli(["generate", "--ckpt", str(run), "--ids", "3,4,5", "--max-new-tokens", "4", "--dtype",
                     "float32", "--no-quant-sim"], env)
    assert generated.returncode == 0, generated.stderr[-2000:]
    exported = cli(["export", str(run), str(tmp_path / "published")], env)
    assert exported.returncode == 0, exported.stderr[-2000:]
    published = tmp_path / "published"
    # The base's tokenizer (and generation config) come along, so HF loads the export's tokenizer.
    from v4jax.checkpoint.reader import COMPANION_FILES
    kept = [name for name in COMPANION_FILES if (word_ckpt / name).is_file()]
    assert "tokenizer.json" in kept
    for name in kept:
        assert (published / name).read_bytes() == (word_ckpt / name).read_bytes(), name
    from transformers import PreTrainedTokenizerFast
    assert PreTrainedTokenizerFast.from_pretrained(published)("w3 w4")["input_ids"][-2:] == [3, 4]
    model = load_pretrained(published, dtype="float32", quant_sim=False)
    restored = Transformer(two_layer_config(), rngs=nnx.Rngs(0))
    train.Checkpoints(run).restore(restored, None)
    # Export re-encodes the trained float32 weights to the published dtypes (bf16 here; FP8/FP4 elsewhere).
    for name in ("head.weight", "layers.1.ffn.gate.bias"):
        got, trained_w = (np.asarray(weights.to_flat(m)[name]) for m in (model, restored))
        np.testing.assert_array_equal(got, np.asarray(jnp.asarray(trained_w).astype(jnp.bfloat16).astype(jnp.float32))
                                      if name == "head.weight" else trained_w)


@pytest.fixture(scope="module")
def trained_run(word_ckpt, tmp_path_factory):
    """A training run folder as `v4jax train` leaves it (run.json naming its base, the base's config
    and companion files, an Orbax step), its head "trained" to other values than the base's."""
    import shutil

    from v4jax.checkpoint.reader import COMPANION_FILES

    run = tmp_path_factory.mktemp("run") / "run"
    model = load_pretrained(word_ckpt, dtype="float32", quant_sim=False)
    model.head.weight[...] = jnp.roll(model.head.weight[...], 1, axis=0) * 1.5
    train.Checkpoints(run).save(1, model, None)
    for name in ("config.json",) + COMPANION_FILES:
        if (word_ckpt / name).is_file():
            shutil.copyfile(word_ckpt / name, run / name)
    (run / train.RUN_INFO).write_text(json.dumps({"base": str(word_ckpt), "dtype": "float32"}))
    return run, np.asarray(model.head.weight[...])


def test_export_of_a_run_folder_is_its_latest_step_with_the_base_tokenizer_files(trained_run, word_ckpt, tmp_path):
    from transformers import PreTrainedTokenizerFast

    from v4jax import cli
    from v4jax.checkpoint.reader import COMPANION_FILES

    run, head = trained_run
    cli.main(["export", str(run), str(tmp_path / "published")])
    published = tmp_path / "published"
    kept = [name for name in COMPANION_FILES if (word_ckpt / name).is_file()]
    assert "tokenizer.json" in kept
    for name in kept:
        assert (published / name).read_bytes() == (word_ckpt / name).read_bytes(), name
    assert PreTrainedTokenizerFast.from_pretrained(published)("w3 w4")["input_ids"] == [3, 4]  # HF loads it
    model = load_pretrained(published, dtype="float32", quant_sim=False)
    np.testing.assert_array_equal(np.asarray(model.head.weight[...]),  # published in bf16
                                  np.asarray(jnp.asarray(head).astype(jnp.bfloat16).astype(jnp.float32)))


@pytest.mark.slow  # lm-eval and datasets import, a task's scoring compiles: ~60 s of CPU
def test_lm_eval_scores_a_run_folder_with_its_latest_step(trained_run, tmp_path):
    pytest.importorskip("lm_eval")
    from test_harness import CONTEXTS, CONTINUATIONS, ids, write_tasks

    from v4jax import cli, evaluate

    run, _ = trained_run
    (tmp_path / "tasks").mkdir()
    write_tasks(tmp_path / "tasks")
    cli.main(["lm-eval", "--ckpt", str(run), "--dtype", "float32", "--no-quant-sim", "--max-length", "16",
              "--tasks", "tiny_ll", "--include_path", str(tmp_path / "tasks"), "--log_samples",
              "--output_path", str(tmp_path / "out")])
    (path,) = glob.glob(str(tmp_path / "out" / "**" / "samples_tiny_ll_*.jsonl"), recursive=True)
    got = [float(s["resps"][0][0][0]) for s in sorted(map(json.loads, open(path)), key=lambda s: s["doc_id"])]
    pairs = []  # HFLM's tokens (this tokenizer adds no BOS), at most 16 inputs
    for c, k in zip(CONTEXTS, CONTINUATIONS):
        seq = [*ids(c), *ids(k)][-17:]
        pairs.append((seq[:len(seq) - len(ids(k))], ids(k)))
    trained = load_checkpoint(run, quant_sim=False)
    np.testing.assert_allclose(got, [s.loglikelihood for s in evaluate.loglikelihood(trained, pairs)], rtol=1e-5)


@pytest.mark.slow
def test_a_step_sharded_over_fsdp_and_experts_gives_the_unsharded_parameters_and_router_bias():
    """8 simulated devices (conftest), the training rules: FSDP x expert parallelism with the
    micro-batches accumulated, against one unsharded whole-batch step."""
    from v4jax import sharding as sh

    cfg = two_layer_config()
    # Micro-batches of 8 rows: the training rules split the batch over fsdp x expert.
    ids = np.asarray(jax.random.randint(jax.random.key(2), (16, 64), 0, cfg.vocab_size))
    mask, segments = np.ones_like(ids), np.ones_like(ids)
    segments[:, 40:] = 2
    step = dict(mtp_weight=0.3, balance_weight=1e-2, bias_update_rate=1e-3)
    adamw = OptimizerConfig(learning_rate=1.0, eps=1.0)  # near linear in g, as in the accumulation test
    init = weights.to_flat(Transformer(cfg, rngs=nnx.Rngs(0)))

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    opt = train.make_optimizer(model, adamw)
    want = train.train_step(model, opt, ids, mask, segments, **step)
    want_flat = weights.to_flat(model)

    mesh = sh.make_mesh("fsdp=2,expert=4")
    sharded = sh.shard_model(Transformer(cfg, rngs=nnx.Rngs(0)), mesh, "training")
    with sh.use_rules(mesh, "training"):
        sharded_opt = train.make_optimizer(sharded, adamw)
        got = train.train_step(sharded, sharded_opt, ids, mask, segments, grad_accum=2, **step)
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=2e-6)
    for name, value in weights.to_flat(sharded).items():
        delta_want = np.asarray(want_flat[name]) - init[name]
        # to 1e-4 of the step, and the fp32 spacing of the weights themselves, which the differences inherit
        np.testing.assert_allclose(np.asarray(value) - init[name], delta_want, rtol=0,
                                   atol=1e-4 * np.abs(delta_want).max() + 2 * np.spacing(np.abs(init[name]).max())
                                   + 1e-9, err_msg=name)
    for name in ("layers.1.ffn.gate.bias", "mtp.0.ffn.gate.bias"):
        np.testing.assert_array_equal(weights.to_flat(sharded)[name], want_flat[name])
        assert np.abs(np.asarray(want_flat[name]) - init[name]).max() == pytest.approx(1e-3)
    experts = [v.get_value() for path, v in nnx.to_flat_state(nnx.state(sharded)) if "experts" in map(str, path)
               and "shared_experts" not in map(str, path)]
    assert experts and all(len({str(s.index) for s in x.addressable_shards}) > 1 for x in experts)  # really split


def test_checkpoints_with_wrt_save_and_restore_only_the_selected_variables_and_the_extra_json(tmp_path):
    """What LoRA saves: the adapters (here a custom Variable type) and the optimiser over them, not
    the base weights; the data position rides along as JSON."""
    class Adapter(nnx.Variable):
        pass

    class Tiny(nnx.Module):
        def __init__(self, seed):
            self.base = nnx.Param(jnp.full((3, 4), float(seed)))
            self.adapter = Adapter(jnp.full((4, 2), float(seed)))

    model = Tiny(1)
    opt = train.make_optimizer(model, OptimizerConfig(learning_rate=1e-2), wrt=Adapter)
    checkpoints = train.Checkpoints(tmp_path / "run", wrt=Adapter)
    checkpoints.save(4, model, opt, extra={"data": {"next_index": 9}})
    restored = Tiny(2)
    restored_opt = train.make_optimizer(restored, OptimizerConfig(learning_rate=1e-2), wrt=Adapter)
    assert checkpoints.restore(restored, restored_opt) == 4 and checkpoints.extra(4) == {"data": {"next_index": 9}}
    np.testing.assert_array_equal(restored.adapter[...], np.ones((4, 2)))
    np.testing.assert_array_equal(restored.base[...], np.full((3, 4), 2.0))  # not saved, not touched
    saved = ocp.training.Checkpointer(tmp_path / "run").metadata(4).custom_metadata["checksums"]
    assert [k for k in saved if k.startswith("['model']")] == ["['model']['adapter']"]
    assert any(k.startswith("['optimizer']") for k in saved)


def test_head_logprobs_in_position_chunks_equal_the_whole_log_softmax_and_its_gradient(monkeypatch):
    """The training NLL never forms a sequence's logits: chunks of LOGIT_CHUNK positions (the last one
    padded) give numpy's log-softmax of h Wᵀ at each target, and the gradient of the full formula."""
    from v4jax import train as train_mod

    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 20, 16)).astype(np.float32)
    head = rng.normal(size=(50, 16)).astype(np.float32)
    targets = rng.integers(0, 50, (2, 20)).astype(np.int32)
    logits = np.float64(h) @ np.float64(head).T
    logits -= logits.max(-1, keepdims=True)
    want = np.take_along_axis(logits - np.log(np.exp(logits).sum(-1, keepdims=True)), targets[..., None], -1)[..., 0]

    def full(h, head):
        logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, head), axis=-1)
        return jnp.sum(jnp.sin(jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]))

    want_grads = jax.grad(full, argnums=(0, 1))(h, head)
    monkeypatch.setattr(train_mod, "LOGIT_CHUNK", 7)  # 3 chunks, the last with one padding position
    logp, hit = jax.jit(train_mod.head_logprobs)(h, head, targets)
    np.testing.assert_allclose(np.asarray(logp), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(hit), logits.argmax(-1) == targets)
    grads = jax.grad(lambda h, w: jnp.sum(jnp.sin(train_mod.head_logprobs(h, w, targets)[0])), argnums=(0, 1))(h, head)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)
