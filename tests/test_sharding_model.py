"""The whole tiny model on 8 simulated CPU devices: logits, parameter placement, born-sharded
init and prefill + decode with a sequence-split cache, each against the unsharded model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_model import randomize
from v4jax import placement
from v4jax import sharding as sh
from v4jax.checkpoint import weights
from v4jax.config import ModelConfig
from v4jax.model import Transformer

CFG = ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False)
BATCH, SEQ = 8, 160  # crosses groups of 4 and 128 and the 128-token window
# (mesh, rule set, expert dispatch): pure expert, data x expert, data x tensor, fsdp x expert
MESHES = [
    ("expert=8", "inference", "gather"),
    ("data=2,expert=4", "inference", "a2a"),
    ("data=4,tensor=2", "inference", "gather"),
    ("fsdp=2,expert=4", "training", "gather"),
]


@pytest.fixture(scope="module")
def eager_model():
    """The unsharded model as the model code builds it, and its initial values."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    initial = {k: np.asarray(v) for k, v in weights.to_flat(model).items()}
    randomize(model)
    return model, initial


@pytest.fixture(scope="module")
def ids():
    return np.asarray(jax.random.randint(jax.random.key(1), (BATCH, 204), 0, CFG.vocab_size))


@pytest.fixture(scope="module")
def want_logits(eager_model, ids):
    return np.asarray(jax.jit(lambda m, x: m(x))(eager_model[0], jnp.asarray(ids[:, :SEQ])))


def copy(model):
    return nnx.merge(*nnx.split(model))


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.sqrt(((got - want) ** 2).mean() / (want**2).mean())


@pytest.mark.parametrize("spec, rules, dispatch", MESHES)
def test_sharded_logits_equal_unsharded_and_every_parameter_follows_its_rule(
        eager_model, ids, want_logits, spec, rules, dispatch):
    mesh = sh.make_mesh(spec)
    model = sh.shard_model(copy(eager_model[0]), mesh, rules)
    table = sh.get_rules(rules)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        x = var.get_value()
        want = sh.logical_to_spec(sh.param_axes(var), x.shape, mesh, table)
        assert x.sharding.spec == want, path
    experts = nnx.state(model, lambda path, _: "experts" in path)
    layout = sh.Layout(mesh, table)
    n_shards = layout.size(sum((layout.live_axes(a) for a in ("exp", "mlp_moe", "embed_moe")), ()))
    assert sh.bytes_per_device(experts) * n_shards == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(experts))

    with sh.use_rules(mesh, rules, dispatch=dispatch) as layout:
        logits = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids[:, :SEQ]))
        assert logits.sharding.is_equivalent_to(layout.sharding(("batch", "seq", "act_vocab"), logits.shape), 3)
    assert rel_err(logits, want_logits) < 1e-6
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=0, atol=1e-5 * np.abs(want_logits).max())


def test_create_sharded_model_is_born_sharded_with_the_eager_models_values(eager_model):
    mesh = sh.make_mesh("data=2,expert=4")
    model = placement.create_sharded_model(CFG, mesh, "inference", seed=0)
    w1 = model.layers[2][0].ffn.experts.w1.weight.get_value()
    assert w1.sharding.shard_shape(w1.shape) == (w1.shape[0], w1.shape[1] // 8, *w1.shape[2:])
    initial = eager_model[1]
    got = weights.to_flat(model)
    assert got.keys() == initial.keys()
    for name, value in got.items():
        np.testing.assert_allclose(np.asarray(value), initial[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_optimizer_moments_are_sharded_like_their_parameters(eager_model):
    from v4jax import train

    mesh = sh.make_mesh("fsdp=2,expert=4")
    model = sh.shard_model(copy(eager_model[0]), mesh, "training")
    params = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    moments = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(train.make_optimizer(model)))
               if "mu" in path or "nu" in path}  # opt_state / ... / mu|nu / <parameter path>
    assert len(moments) == 2 * len(params)
    for path, moment in moments.items():
        param = params[path[path.index("mu" if "mu" in path else "nu") + 1:]]
        assert moment.sharding.is_equivalent_to(param.sharding, param.ndim), path
    w1 = next(m for p, m in moments.items() if "w1" in p and "experts" in p)
    assert w1.sharding.shard_shape(w1.shape)[-3] == w1.shape[-3] // 4  # experts split 4 ways, moments too


def test_prefill_and_decode_with_a_sequence_split_cache_equal_the_unsharded_forward(eager_model, ids, want_logits):
    """Compressed entries (and indexer keys) of each sequence are split over 2 devices, so the
    indexer's top-k runs as local top-k + all-gather + global top-k: a 150-token prefill (37
    entries on both devices) then 3 decode steps give the unsharded whole-sequence logits."""
    prompt, max_len, b = 150, 256, 2
    mesh = sh.make_mesh("data=2,sequence=2,expert=2")
    model = sh.shard_model(copy(eager_model[0]), mesh, "inference")
    got = []
    with sh.use_rules(mesh, "inference"):
        step = jax.jit(lambda m, x, s: m.forward(x, s)[::2])
        state = placement.create_sharded_cache(CFG, b, max_len, mesh, "inference")
        logits, state = step(model, jnp.asarray(ids[:b, :prompt]), state)
        got.append(logits[:, -1])
        for t in range(prompt, prompt + 3):
            logits, state = step(model, jnp.asarray(ids[:b, t:t + 1]), state)
            got.append(logits[:, -1])
    entries = state["layers"][1][0]["entries"]  # [reps, batch, N, d]: batch over data, N over sequence
    assert entries.sharding.shard_shape(entries.shape) == (entries.shape[0], 1, entries.shape[2] // 2,
                                                           entries.shape[3])
    got, want = np.stack(got, axis=1), want_logits[:b, prompt - 1:prompt + 3]
    assert rel_err(got, want) < 1e-6
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize("spec, dispatch", [("fsdp=2,expert=4", "gather"), ("fsdp=2,expert=4", "a2a"),
                                            ("fsdp=2,expert=2,tensor=2", "gather")])
def test_training_rules_give_the_unsharded_loss_and_gradients(eager_model, ids, spec, dispatch):
    """FSDP x expert (x tensor) parallelism: the backward pass runs through the dispatch collectives;
    with tensor, the heads, expert widths, vocabulary and residual streams of a sequence are split."""
    from v4jax import train

    def loss_and_grads(model, x, mask):
        grad_fn = nnx.value_and_grad(lambda m: train.lm_loss(m, x, mask, 0.3), has_aux=True,
                                     argnums=nnx.DiffState(0, nnx.Param))
        (loss, _), grads = grad_fn(model)
        return loss, grads

    x = jnp.asarray(ids[:, :64])
    mask = jnp.ones_like(x)
    want_loss, want_grads = nnx.jit(loss_and_grads)(eager_model[0], x, mask)
    mesh = sh.make_mesh(spec)
    model = sh.shard_model(copy(eager_model[0]), mesh, "training")
    with sh.use_rules(mesh, "training", dispatch=dispatch):
        loss, grads = nnx.jit(loss_and_grads)(model, x, mask)
    assert abs(float(loss) - float(want_loss)) < 1e-5 * abs(float(want_loss))
    for (path, g), (_, w) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(want_grads)):
        g, w = np.asarray(g.get_value()), np.asarray(w.get_value())
        if not w.any():  # the indexer picks entries by top-k, which passes no gradient to its weights
            np.testing.assert_array_equal(g, w, err_msg=str(path))
            continue
        assert rel_err(g, w) < 1e-4, path
