"""Optimisers for fine-tuning (training spec §5): AdamW, and V4's Muon/AdamW split.

Which rule a parameter gets is decided from its dotted name by one table (`PARAM_RULES`):
AdamW for the embedding, the head, every RMSNorm weight, the mHC static biases and gating
factors (`hc_*_base`, `hc_*_scale`), the attention sinks and the compressor position
biases; Muon for every other matrix (projections, `hc_*_fn`, gates, shared and routed
experts). Weight decay is applied to matrices only (spec §10.7).

Muon follows the report's Algorithm 1 exactly rather than `optax.contrib.muon` (whose
momentum is a bias-corrected EMA, spec §5): M_t = mu M_{t-1} + G_t, O = HybridNS(mu M_t + G_t)
* sqrt(max(n, m)) * 0.18, W_t = W_{t-1} (1 - lr wd) - lr O. Every dim but the last two of a
Muon leaf is a batch of independent matrices (scanned layers, routed experts, `wo_a` groups).
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

# (pattern over the dotted parameter name, rule, weight decay); the first match wins.
PARAM_RULES: tuple[tuple[str, str, bool], ...] = (
    (r"(^|\.)embed\.weight$", "adamw", True),
    (r"(^|\.)head\.weight$", "adamw", True),
    (r"norm\.weight$", "adamw", False),  # attn_norm, ffn_norm, q_norm, kv_norm, enorm, hnorm, norm, compressor
    (r"(^|\.)hc_\w+_(base|scale)$", "adamw", False),  # mHC static biases S and gating factors alpha
    (r"(^|\.)attn_sink$", "adamw", False),
    (r"(^|\.)ape$", "adamw", False),  # compressor position biases
    (r".", "muon", True),
)

# HybridNS (report Algorithm 1): 8 steps driving singular values towards 1 fast, 2 settling them.
NS_COEFFS = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """What `make_transform` builds. Defaults: spec §5 / §10.5 for fine-tuning."""

    name: str = "adamw"  # "adamw" (every parameter) or "muon" (V4's split)
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int | None = None  # cosine decay over the steps after warm-up (None: constant)
    end_lr_ratio: float = 0.1  # final LR / peak LR (V4: 2.7e-5 / 2.7e-4)
    weight_decay: float = 0.1
    clip_norm: float | None = 1.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8  # V4 pre-training used 1e-20; 1e-8 is safer in bf16 (spec §10.5)
    muon_momentum: float = 0.95
    muon_rms: float = 0.18

    def __post_init__(self):
        if self.name not in ("adamw", "muon"):
            raise ValueError(f"optimizer {self.name!r}: expected 'adamw' or 'muon'")


def param_rule(name: str) -> tuple[str, bool]:
    """(rule, weight decay) of the parameter with this dotted name."""
    for pattern, rule, decay in PARAM_RULES:
        if re.search(pattern, name):
            return rule, decay
    raise AssertionError("PARAM_RULES ends in a catch-all")


def path_name(path) -> str:
    """A pytree key path as the dotted parameter name (`layers.2.0.attn.wq_a.weight`)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    if parts and parts[-1] == "value":  # an nnx.Variable's own node
        parts.pop()
    return ".".join(parts)


def param_labels(params, name: str = "muon"):
    """The rule of every leaf ("adamw" / "muon"); with name="adamw" every leaf is "adamw"."""
    def one(path, x):
        rule, _ = param_rule(path_name(path))
        if rule == "muon" and x.ndim < 2:
            raise ValueError(f"parameter {path_name(path)}: Muon needs a matrix, got shape {x.shape}")
        return rule if name == "muon" else "adamw"

    return jax.tree_util.tree_map_with_path(one, params)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: param_rule(path_name(path))[1], params)


def schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warm-up to the peak LR, then cosine decay to end_lr_ratio x peak at total_steps
    (or constant without total_steps)."""
    if cfg.total_steps is None:
        return optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps) if cfg.warmup_steps else \
            optax.constant_schedule(cfg.learning_rate)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1), end_value=cfg.learning_rate * cfg.end_lr_ratio)


def hybrid_newton_schulz(g: jax.Array, eps: float = 1e-7) -> jax.Array:
    """Approximate orthogonalisation U Vᵀ of g = U S Vᵀ: [..., n, m] -> [..., n, m] float32."""
    x = g.astype(jnp.float32)
    wide = x.shape[-2] > x.shape[-1]
    if wide:  # iterate on the smaller Gram matrix
        x = jnp.swapaxes(x, -1, -2)
    x = x / (jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True)) + eps)
    for a, b, c in NS_COEFFS:
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return jnp.swapaxes(x, -1, -2) if wide else x


class MuonState(NamedTuple):
    momentum: optax.Updates


def scale_by_v4_muon(momentum: float = 0.95, rms: float = 0.18) -> optax.GradientTransformation:
    """The report's Muon update direction (before weight decay and learning rate)."""
    def init(params):
        return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update(grads, state, params=None):
        del params
        m = jax.tree.map(lambda m, g: momentum * m + g.astype(jnp.float32), state.momentum, grads)

        def direction(m, g):
            scale = rms * max(g.shape[-2], g.shape[-1]) ** 0.5
            return (hybrid_newton_schulz(momentum * m + g.astype(jnp.float32)) * scale).astype(g.dtype)

        return jax.tree.map(direction, m, grads), MuonState(m)

    return optax.GradientTransformation(init, update)


def make_transform(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation of `cfg`; the rule of each leaf comes from its dotted name."""
    lr = schedule(cfg)
    adamw = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask,
                        nesterov=False)
    if cfg.name == "adamw":
        body = adamw
    else:
        muon = optax.chain(scale_by_v4_muon(cfg.muon_momentum, cfg.muon_rms),
                           optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
                           optax.scale_by_learning_rate(lr))
        # Labels from the tree optax is handed (nnx.Optimizer passes plain arrays, not Variables).
        body = optax.partition({"adamw": adamw, "muon": muon}, lambda tree: param_labels(tree, cfg.name))
    if cfg.clip_norm is None:
        return body
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), body)
