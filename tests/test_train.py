"""Fine-tuning: loss goes down, only nnx.Param moves, save/resume continues exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import train
from v4jax.checkpoint import weights
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.optim import OptimizerConfig


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


def test_packed_batches_cover_documents_with_eos():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ids, mask = next(train.packed_batches(docs, seq_len=4, batch_size=3))
    assert ids.shape == (3, 4) and mask.all()
    assert sorted(ids.reshape(-1).tolist()) == sorted([5, 6, 7, 1, 8, 9, 1, 10, 11, 12, 13, 1])
