"""Mesh specs, the rules resolver, parameter / cache / checkpoint placement, expert dispatch and
sequence-sharded top-k on 8 simulated CPU devices (small programs; the whole model is in
test_sharding_model.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from v4jax import placement
from v4jax.checkpoint.loading import checkpoint_sharding
from v4jax import sharding as sh
from v4jax.cache import CACHE_AXES, init_cache
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.moe import grouped_experts
from v4jax.sharding import experts

ACTIVATION_AXES = ("batch", "seq", "act_embed", "act_heads", "act_vocab")


# ---------------------------------------------------------------------------- mesh
def test_mesh_spec_names_all_five_axes_and_fills_one():
    assert sh.parse_mesh_spec("data=2,expert=4", 8) == dict(data=2, fsdp=1, expert=4, tensor=1, sequence=1)
    assert sh.parse_mesh_spec("expert=-1,tensor=2", 8)["expert"] == 4
    assert sh.parse_mesh_spec("", 1) == dict.fromkeys(sh.AXES, 1)
    mesh = sh.make_mesh("fsdp=2,expert=4")
    assert mesh.axis_names == sh.AXES and mesh.shape["expert"] == 4
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert sh.describe(mesh) == "fsdp=2,expert=4"


@pytest.mark.parametrize("spec, message", [
    ("data=3", "needs 3 devices; 8 are available"),
    ("model=8", "unknown axis 'model'"),
    ("data=2,data=4", "given twice"),
    ("data", "not axis=size"),
    ("data=-1,expert=-1", "at most one -1"),
    ("data=x", "not an integer"),
])
def test_bad_mesh_specs_raise(spec, message):
    with pytest.raises(sh.MeshError, match=message):
        sh.parse_mesh_spec(spec, 8)


# ---------------------------------------------------------------------------- resolver
def test_resolver_maps_names_to_mesh_axes_and_drops_size_one_axes():
    mesh = sh.make_mesh("data=2,expert=4")
    spec = sh.logical_to_spec(("layers", "exp", "mlp_moe", "embed_moe"), (3, 8, 64, 128), mesh, sh.INFERENCE)
    assert spec == P(None, ("data", "expert"), None, None)  # mlp_moe -> tensor has size 1
    assert sh.logical_to_spec(("cache_batch", "cache_seq", "cache_kv"), (2, 64, 8), mesh, sh.INFERENCE) == \
        P("data", None, None)


def test_resolver_raises_on_mesh_axis_used_twice_naming_tensor():
    mesh = sh.make_mesh("fsdp=2,expert=4")
    rules = dict(sh.TRAINING, mlp_moe="fsdp")
    with pytest.raises(sh.ShardingError, match=r"experts.w1: mesh axis 'fsdp' would split both dim 1 \('mlp_moe'\) "
                                               r"and dim 2 \('embed_moe'\)"):
        sh.logical_to_spec(("exp", "mlp_moe", "embed_moe"), (8, 64, 128), mesh, rules, "experts.w1")
    # a clash is a rule error on every mesh, even where the axis has size 1
    with pytest.raises(sh.ShardingError, match="would split both"):
        sh.logical_to_spec(("exp", "mlp_moe", "embed_moe"), (8, 64, 128), sh.make_mesh("expert=8"), rules)


def test_resolver_raises_on_non_divisible_dim_and_missing_rule():
    mesh = sh.make_mesh("data=2,tensor=4")
    with pytest.raises(sh.ShardingError, match=r"wo_a: dim 0 \('o_groups'\) of size 2 does not divide by mesh axes "
                                               r"\('tensor',\) of size 4"):
        sh.logical_to_spec(("o_groups", "o_lora", None), (2, 64, 256), mesh, sh.INFERENCE, "wo_a")
    with pytest.raises(sh.ShardingError, match="logical axis 'nonsense' has no rule"):
        sh.logical_to_spec(("nonsense",), (8,), mesh, sh.INFERENCE)
    with pytest.raises(sh.ShardingError, match="unknown rule set"):
        sh.get_rules("serving")


def test_one_jitted_function_under_two_rule_sets_compiles_one_program_per_layout():
    mesh = sh.make_mesh("data=2,tensor=4")
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return sh.constrain(x * 2, ("batch", "act_heads"))

    x = jnp.ones((8, 8))
    swapped = {**sh.INFERENCE, "batch": None, "act_heads": ("data", "tensor")}
    with sh.use_rules(mesh, "inference"):
        first = f(x)
    with sh.use_rules(mesh, swapped):
        second = f(x)
    with sh.use_rules(mesh, dict(swapped)):  # an equal table is the same layout: no new trace
        third = f(x)
    assert first.sharding.spec == P("data", "tensor")
    assert second.sharding.spec == P(None, ("data", "tensor")) == third.sharding.spec
    assert len(traces) == 2


@pytest.fixture(scope="module")
def tiny_abstract():
    cfg = ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False)
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("rules", ["inference", "training"])
def test_every_logical_name_the_model_uses_has_a_rule(tiny_abstract, rules):
    table = sh.get_rules(rules)
    names = {a for _, v in nnx.to_flat_state(nnx.state(tiny_abstract)) for a in sh.param_axes(v)}
    names |= {a for axes in CACHE_AXES.values() for a in axes} | {"layers"} | set(ACTIVATION_AXES)
    names.discard(None)
    assert names <= set(table), sorted(names - set(table))


def test_every_parameter_carries_logical_axes_matching_its_rank(tiny_abstract):
    for path, var in nnx.to_flat_state(nnx.state(tiny_abstract)):
        axes = var.get_metadata()["logical_axes"]
        assert len(axes) <= len(var.get_value().shape), path


# ---------------------------------------------------------------------------- placement of the published sizes
@pytest.fixture(scope="module")
def flash_abstract():
    cfg = ModelConfig.from_json("configs/flash.json", quantized=True)
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


@pytest.mark.parametrize("spec", ["expert=8", "data=2,expert=4", "data=4,tensor=2"])
def test_flash_experts_hold_total_over_n_bytes_per_device(flash_abstract, spec):
    mesh = sh.make_mesh(spec)
    model = sh.shard_model(nnx.merge(*nnx.split(flash_abstract)), mesh, "inference")
    parts = {"exp": mesh.shape["data"] * mesh.shape["expert"], "mlp_moe": mesh.shape["tensor"]}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if "experts" in path:
            x = var.get_value()
            want = tuple(n // parts.get(a, 1) for n, a in zip(x.shape, sh.param_axes(var)))
            assert x.sharding.shard_shape(x.shape) == want, path
    experts_state = nnx.state(model, lambda path, _: "experts" in path)
    total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(experts_state))
    assert sh.bytes_per_device(experts_state) * mesh.size == total


def test_pro_experts_do_not_divide_over_256_and_the_error_says_so():
    cfg = ModelConfig.from_json("configs/pro.json", quantized=True)
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    mesh = jax.sharding.AbstractMesh((1, 1, 256, 1, 1), sh.AXES)  # shardings are only resolved, never used
    with pytest.raises(sh.ShardingError, match=r"ffn\.experts\.w1\.(weight|scale): dim 1 \('exp'\) of size 384 does not divide "
                                               r"by mesh axes \('expert',\) of size 256"):
        sh.state_shardings(nnx.state(abstract), mesh, "inference")


def test_cache_shardings_follow_cache_axes_and_long_context_splits_entries():
    cfg = ModelConfig.from_json("configs/tiny.json")
    mesh = sh.make_mesh("data=2,sequence=4")
    abstract = jax.eval_shape(lambda: init_cache(cfg, 2, 1024))
    placed = placement.shard_cache(abstract, mesh, "inference")
    csa = placed["layers"][1][0]  # [csa-hash] segment: [reps, batch, N, d]
    assert csa["entries"].sharding.spec == P(None, "data", "sequence", None)
    assert csa["index_keys"].sharding.spec == P(None, "data", "sequence", None)
    assert csa["window"].sharding.spec == P(None, "data", None, None)  # the window ring is never split by sequence
    assert placed["pos"].sharding.spec == P("data")
    compressed = [x for seg in placed["layers"] for unit in seg for k, x in unit.items() if k in ("entries", "index_keys")]
    assert sh.bytes_per_device(compressed) * 8 == sum(x.size * x.dtype.itemsize for x in compressed)


def test_checkpoint_sharding_places_flat_tensors_by_their_parameter_axes(tiny_abstract):
    mesh = sh.make_mesh("data=2,expert=4")
    sharding_for = checkpoint_sharding(tiny_abstract, mesh, "inference")
    assert sharding_for("layers.3.ffn.experts.w2.weight", (8, 128, 64)).spec == P(("data", "expert"), None, None)
    assert sharding_for("embed.weight", (512, 128)).spec == P(None, None)
    stacked = sharding_for("layers.3.ffn.experts.w2.weight", (2, 8, 128, 64))  # with a stacked "layers" dim
    assert stacked.spec == P(None, ("data", "expert"), None, None)
    with pytest.raises(KeyError, match="not a parameter"):
        sharding_for("layers.99.attn.wq_a.weight", (128, 128))


# ---------------------------------------------------------------------------- expert dispatch
E, F, D, K = 8, 256, 128, 2


@pytest.fixture(scope="module")
def moe_inputs():
    keys = jax.random.split(jax.random.key(0), 6)
    n = 64
    x = jax.random.normal(keys[0], (n, D))
    scores = jax.random.normal(keys[1], (n, E))
    ids = jax.lax.top_k(scores, K)[1].astype(jnp.int32)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (n, K)))
    w1 = jax.random.normal(keys[3], (E, F, D)) * D**-0.5
    w2 = jax.random.normal(keys[4], (E, D, F)) * F**-0.5
    w3 = jax.random.normal(keys[5], (E, F, D)) * D**-0.5
    return x, ids, weights, w1, w2, w3


def dispatch(layout_args, inputs, act_quant=False):
    mesh, rules, kwargs = layout_args
    with sh.use_rules(mesh, rules, **kwargs):
        fn = jax.jit(lambda *a: sh.expert_dispatch(grouped_experts, *a, limit=7.0, act_quant=act_quant))
        return np.asarray(fn(*inputs))


@pytest.mark.parametrize("spec, rules, kwargs", [
    ("expert=8", "inference", {}),
    ("data=2,expert=2,tensor=2", "inference", {}),
    ("fsdp=2,expert=4", "training", {}),
    ("expert=8", "inference", dict(dispatch="a2a")),
    ("data=2,expert=2,tensor=2", "inference", dict(dispatch="a2a")),
    ("fsdp=2,expert=2,tensor=2", "training", dict(dispatch="a2a")),
])
def test_expert_dispatch_backends_equal_all_local_experts(moe_inputs, spec, rules, kwargs):
    want = np.asarray(grouped_experts(*moe_inputs, limit=7.0, act_quant=False, n_experts=E))
    got = dispatch((sh.make_mesh(spec), rules, kwargs), moe_inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def kept_assignments(ids, limit):
    """Which (token, slot) assignments an exchange keeps on the mesh expert=4,data=2 under TRAINING rules.

    Device d = 4*data + expert holds token rows 8d .. 8d+7 and sends each assignment to
    expert shard id // 2 of its data group, sorted by shard (stable). limit(counts, i, j)
    is how many of sender i's rows for shard j survive (counts [4, 4] of the group).
    """
    ids = np.asarray(ids)
    dest = (ids // 2).reshape(8, -1)  # [device, 8 tokens * K]
    counts = np.stack([np.bincount(d, minlength=4) for d in dest]).reshape(2, 4, 4)
    kept = np.zeros_like(dest, bool)
    for d in range(8):
        rank = np.zeros(dest.shape[1], int)
        for j in range(4):
            sel = np.flatnonzero(dest[d] == j)
            rank[sel] = np.arange(len(sel))
        kept[d] = rank < np.array([limit(counts[d // 4], d % 4, j) for j in range(4)])[dest[d]]
    return kept.reshape(ids.shape)


def test_a2a_with_capacity_drops_only_assignments_beyond_capacity(moe_inputs):
    x, ids, weights, *w = moe_inputs
    ids = ids.at[:, 0].set(0)  # expert 0 is everyone's first choice: its shard overflows
    got = dispatch((sh.make_mesh("expert=4,data=2"), "training", dict(dispatch="a2a", capacity_factor=1.0)),
                   (x, ids, weights, *w))
    # 8 tokens x 2 assignments per device: capacity ceil(16 / 4) = 4 rows per destination
    kept = kept_assignments(ids, lambda counts, i, j: 4)
    assert 0 < kept.sum() < kept.size
    want = grouped_experts(x, jnp.where(kept, ids, -1), weights, *w, limit=7.0, act_quant=False, n_experts=E)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


def test_ffn_split_that_straddles_fp8_activation_blocks_raises(moe_inputs):
    with pytest.raises(sh.ShardingError, match="F_local = 64, not a multiple of the FP8 activation block"):
        dispatch((sh.make_mesh("expert=2,tensor=4"), "inference", {}), moe_inputs, act_quant=True)


def test_ragged_dispatch_is_refused_on_cpu(moe_inputs):
    with pytest.raises(sh.ShardingError, match="XLA:CPU does not implement"):
        dispatch((sh.make_mesh("expert=8"), "inference", dict(dispatch="ragged")), moe_inputs)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
    """ragged_all_to_all from dense collectives, per its documented semantics (XLA:CPU lacks it)."""
    n = jax.lax.psum(1, axis_name)
    me = jax.lax.axis_index(axis_name)
    all_ops = jax.lax.all_gather(operand, axis_name)  # [S, M, ...]
    src_off = jax.lax.all_gather(input_offsets, axis_name)[:, me]
    sizes = jax.lax.all_gather(send_sizes, axis_name)[:, me]
    dst_off = jax.lax.all_gather(output_offsets, axis_name)[:, me]
    rows = jnp.arange(output.shape[0])
    for i in range(n):
        r = rows - dst_off[i]
        hit = (r >= 0) & (r < sizes[i])
        vals = all_ops[i][jnp.clip(src_off[i] + r, 0, operand.shape[0] - 1)]
        output = jnp.where(hit.reshape((-1,) + (1,) * (output.ndim - 1)), vals, output)
    return output


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_ragged_dispatch_offsets_are_right_with_an_emulated_collective(moe_inputs, monkeypatch, capacity_factor):
    """The ragged path's sizes and offsets, checked on CPU by standing in the documented collective."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(experts, "_check_ragged_supported", lambda plan: None)
    x, ids, weights, *w = moe_inputs
    ids = ids.at[:, 0].set(0)
    kwargs = dict(dispatch="ragged", capacity_factor=capacity_factor)
    got = dispatch((sh.make_mesh("expert=4,data=2"), "training", kwargs), (x, ids, weights, *w))
    if capacity_factor is None:
        kept = np.ones(ids.shape, bool)
    else:  # a receiver holds 16 rows and takes them from senders 0, 1, ... in turn
        kept = kept_assignments(ids, lambda counts, i, j: np.clip(16 - counts[:i, j].sum(), 0, counts[i, j]))
        assert 0 < kept.sum() < kept.size
    want = grouped_experts(x, jnp.where(kept, ids, -1), weights, *w, limit=7.0, act_quant=False, n_experts=E)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- sequence-sharded top-k
def test_sequence_sharded_top_k_equals_lax_top_k_with_ties_and_masked_entries():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, size=(2, 3, 64)).astype(np.float32)  # many ties
    scores[:, :, 40:] = -np.inf  # entries not yet visible
    scores[1, 2, :] = -np.inf
    mesh = sh.make_mesh("data=2,sequence=4")
    with sh.use_rules(mesh, "inference"):
        x = jax.device_put(scores, jax.sharding.NamedSharding(mesh, P("data", None, "sequence")))
        values, idx = jax.jit(lambda s: sh.top_k(s, 12, ("batch", None, "cache_seq")))(x)
    want_v, want_i = jax.lax.top_k(jnp.asarray(scores), 12)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_v))
    np.testing.assert_array_equal(np.asarray(idx), np.asarray(want_i))
