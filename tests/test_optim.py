"""The fine-tuning optimisers against numpy written here from the training spec (§5): which
parameter gets which rule, one AdamW step, one Muon step (exact momentum, HybridNS, RMS
matching, decoupled decay), the warm-up + cosine schedule and clipping."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import optim
from v4jax.config import ModelConfig
from v4jax.model import Transformer


CHECKED = ("layers.2.0.ffn.experts.w1.weight", "layers.2.0.attn.wo_a.weight", "hc_head_fn", "embed.weight",
           "layers.2.0.attn.q_norm.weight", "layers.2.0.hc_attn_scale")


@pytest.fixture(scope="module")
def abstract_params():
    cfg = ModelConfig.from_json("configs/tiny.json", dtype="float32")
    return nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)


@pytest.fixture(scope="module")
def params(abstract_params):
    """A few of the tiny model's parameters (real names and shapes: stacked layers, experts, wo_a
    groups, vectors) as a nested dict of random values."""
    shapes = {optim.path_name(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
    rng = np.random.default_rng(0)
    tree: dict = {}
    for name in CHECKED:
        *parents, last = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = jnp.asarray(rng.normal(size=shapes[name]), jnp.float32)
    return tree


def named(tree) -> dict[str, np.ndarray]:
    return {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name, rule, decay", [
    ("embed.weight", "adamw", True),
    ("head.weight", "adamw", True),
    ("norm.weight", "adamw", False),
    ("hc_head_base", "adamw", False),
    ("hc_head_scale", "adamw", False),
    ("hc_head_fn", "muon", True),
    ("layers.2.0.attn.q_norm.weight", "adamw", False),
    ("layers.2.0.attn.attn_sink", "adamw", False),
    ("layers.2.1.attn.compressor.ape", "adamw", False),
    ("layers.2.1.attn.compressor.norm.weight", "adamw", False),
    ("layers.2.1.attn.compressor.wkv.weight", "muon", True),
    ("layers.2.1.attn.indexer.wq_b.weight", "muon", True),
    ("layers.2.0.attn.wo_a.weight", "muon", True),
    ("layers.2.0.hc_attn_fn", "muon", True),
    ("layers.2.0.hc_ffn_base", "adamw", False),
    ("layers.2.0.ffn.gate.weight", "muon", True),
    ("layers.2.0.ffn.experts.w2.weight", "muon", True),
    ("layers.2.0.ffn.shared_experts.w1.weight", "muon", True),
    ("mtp.0.e_proj.weight", "muon", True),
    ("mtp.0.enorm.weight", "adamw", False),
    ("mtp.0.hnorm.weight", "adamw", False),
])
def test_each_parameter_gets_the_rule_the_report_gives_it(abstract_params, name, rule, decay):
    labels = {optim.path_name(p): r for p, r in jax.tree_util.tree_leaves_with_path(optim.param_labels(abstract_params))}
    assert name in labels, sorted(labels)
    assert (str(labels[name]), optim.param_rule(name)[1]) == (rule, decay)


def np_schedule(step, peak, warmup, total, end):
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * t))


def test_schedule_is_linear_warmup_then_cosine_to_the_end_ratio():
    cfg = optim.OptimizerConfig(learning_rate=2e-4, warmup_steps=10, total_steps=110, end_lr_ratio=0.1)
    lr = optim.schedule(cfg)
    for step in (0, 3, 10, 11, 60, 109, 110, 500):
        assert float(lr(step)) == pytest.approx(np_schedule(step, 2e-4, 10, 110, 2e-5), rel=1e-5, abs=1e-12)
    constant = optim.schedule(optim.OptimizerConfig(learning_rate=2e-4, warmup_steps=10))
    assert [float(constant(s)) for s in (0, 5, 10, 10 ** 6)] == pytest.approx([0.0, 1e-4, 2e-4, 2e-4])


def np_newton_schulz(g):
    coeffs = [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2
    x = g.astype(np.float64)
    flip = x.shape[0] > x.shape[1]
    if flip:
        x = x.T
    x = x / (np.linalg.norm(x) + 1e-7)
    for a, b, c in coeffs:
        s = x @ x.T
        x = a * x + b * s @ x + c * s @ s @ x
    return x.T if flip else x


def np_muon_leaf(p, grads, lr, wd, mu=0.95, rms=0.18):
    """Report Algorithm 1 for one matrix over several steps; leading dims are separate matrices."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    for g in grads:
        m = mu * m + g
        nest = mu * m + g
        flat = nest.reshape(-1, *nest.shape[-2:])
        o = np.stack([np_newton_schulz(x) for x in flat]).reshape(p.shape)
        o *= math.sqrt(max(p.shape[-2:])) * rms
        p = p * (1 - lr * wd) - lr * o
    return p


def np_adamw_leaf(p, grads, lr, wd, b1, b2, eps):
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p)
    return p


@pytest.mark.parametrize("name", ["muon", "adamw"])
def test_two_steps_equal_the_report_update_per_rule(params, name):
    cfg = optim.OptimizerConfig(name=name, learning_rate=1e-2, weight_decay=0.1, clip_norm=None)
    tx = optim.make_transform(cfg)
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(2)]
    state = tx.init(params)
    new = params
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads:
        updates, state = step(g, state, new)
        new = optax_apply(new, updates)
    got, start = named(new), named(params)
    g_named = [named(g) for g in grads]
    checked = set()
    for leaf in CHECKED:
        rule, decay = optim.param_rule(leaf)
        rule = rule if name == "muon" else "adamw"
        wd = 0.1 if decay else 0.0
        gs = [g[leaf] for g in g_named]
        if rule == "muon":
            want = np_muon_leaf(start[leaf], gs, 1e-2, wd)
        else:
            want = np_adamw_leaf(start[leaf], gs, 1e-2, wd, 0.9, 0.95, 1e-8)
        np.testing.assert_allclose(got[leaf], want, rtol=2e-4, atol=2e-5, err_msg=leaf)
        checked.add(rule)
    assert checked == ({"muon", "adamw"} if name == "muon" else {"adamw"})


def optax_apply(params, updates):
    return jax.tree.map(lambda p, u: p + u, params, updates)


def test_hybrid_newton_schulz_drives_singular_values_to_one():
    g = np.random.default_rng(2).normal(size=(3, 48, 32)).astype(np.float32)
    s = np.linalg.svd(np.asarray(optim.hybrid_newton_schulz(jnp.asarray(g))), compute_uv=False)
    assert np.all(np.abs(s - 1) < 0.03), s.min()


def test_clipping_scales_the_global_norm_before_the_update(params):
    # eps = 1 makes Adam's first step depend on the gradient's scale: -lr * g / (|g| + 1).
    cfg = optim.OptimizerConfig(name="adamw", learning_rate=1.0, weight_decay=0.0, clip_norm=0.5, eps=1.0)
    tx = optim.make_transform(cfg)
    grads = jax.tree.map(lambda x: jnp.full(x.shape, 3.0, jnp.float32), params)
    norm = math.sqrt(sum(3.0 ** 2 * x.size for x in jax.tree.leaves(grads)))
    g = 3.0 * 0.5 / norm
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for u in jax.tree.leaves(updates):
        np.testing.assert_allclose(np.asarray(u), -g / (g + 1.0), rtol=1e-4)
