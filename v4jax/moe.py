"""Mixture of experts (spec §2.9): sqrt-softplus gate, hash or bias-corrected top-k routing,
clamped SwiGLU experts, one shared expert.

Routing is separate from expert compute so that every dispatch backend (local
grouped matmul here, expert-parallel ones in `v4jax.sharding`) shares it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.config import LayerKind, ModelConfig
from v4jax.linear import Linear, kernel
from v4jax.params import Constant, Quantized, RouterBias, normal, param
from v4jax.sharding import expert_dispatch


def gate_scores(x, w_gate):
    """x: [..., dim], w_gate: [E, dim] -> sqrt(softplus(x W_gᵀ)): [..., E] float32."""
    logits = jnp.einsum("...d,ed->...e", x.astype(jnp.float32), w_gate.astype(jnp.float32))
    return jnp.sqrt(jax.nn.softplus(logits))


def route(scores, k: int, route_scale: float, bias=None, hash_ids=None):
    """Pick k experts per token and their weights.

    scores: [..., E]; bias: [E] (selection only) or hash_ids: [..., k] (fixed per token id).
    Returns ids [..., k] int32 and weights [..., k] float32 = normalised scores * route_scale.
    """
    if hash_ids is None:
        _, ids = jax.lax.top_k(scores + bias, k)
    else:
        ids = hash_ids
    w = jnp.take_along_axis(scores, ids, axis=-1)
    return ids.astype(jnp.int32), w / jnp.sum(w, axis=-1, keepdims=True) * route_scale


def clamped_swiglu(g, v, limit: float):
    """silu(min(g, L)) * clip(v, -L, L) in float32."""
    g = jnp.minimum(g.astype(jnp.float32), limit)
    v = jnp.clip(v.astype(jnp.float32), -limit, limit)
    return jax.nn.silu(g) * v


def ragged_matmul_t(x, w, group_sizes):
    """x: [M, in] rows sorted by group, w: [G, out, in] -> [M, out] float32 (row r uses its group's w)."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(x, w.astype(x.dtype), group_sizes, dims, preferred_element_type=jnp.float32)


def grouped_experts(x, ids, weights, w1, w2, w3, *, limit: float, act_quant: bool, n_experts: int):
    """Routed-expert FFN with tokens sorted by expert (one grouped matmul per projection).

    x: [N, dim]; ids, weights: [N, k]; w1, w3: [E, F, dim]; w2: [E, dim, F] (E local
    experts; ids outside 0..E-1 contribute nothing). Returns [N, dim] float32, the
    weighted sum over each token's experts.
    """
    n, k = ids.shape
    flat = ids.reshape(-1)
    local = (flat >= 0) & (flat < n_experts)
    order = jnp.argsort(jnp.where(local, flat, n_experts))  # foreign experts sort last
    token = order // k
    group_sizes = jnp.bincount(jnp.where(local, flat, n_experts), length=n_experts + 1)[:n_experts]
    xs = x[token]
    if act_quant:
        xs = quant.fake_quant_fp8(xs, quant.FP8_BLOCK)
    h = clamped_swiglu(ragged_matmul_t(xs, w1, group_sizes), ragged_matmul_t(xs, w3, group_sizes), limit)
    # The routing weight scales h before the down projection, as in the reference.
    h = (h * weights.reshape(-1)[order][:, None]).astype(x.dtype)
    if act_quant:
        h = quant.fake_quant_fp8(h, quant.FP8_BLOCK)
    y = ragged_matmul_t(h, w2, group_sizes).astype(x.dtype).astype(jnp.float32)
    y = jnp.where(local[order][:, None], y, 0.0)
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(y)


class ExpertWeights(nnx.Module):
    """One projection of all routed experts: [E, out, in] (or its FP4/FP8 codes + scales)."""

    def __init__(self, cfg: ModelConfig, n: int, out_dim: int, in_dim: int, rngs: nnx.Rngs, axes):
        if not cfg.quantized:
            self.weight = param(normal(rngs, (n, out_dim, in_dim), in_dim**-0.5, cfg.dtype), axes)
            return
        unit = 2.0 ** -round(math.log2(in_dim) / 2)
        if cfg.expert_dtype == "fp4":
            codes = jax.random.randint(rngs.params(), (n, out_dim, in_dim // 2), -128, 128, jnp.int32)
            self.weight = param(codes.astype(jnp.int8), axes, Quantized)
            self.scale = param(jnp.full((n, out_dim, in_dim // quant.FP4_GROUP), unit / 4, jnp.float32), axes,
                               Quantized)
        else:
            self.weight = param(normal(rngs, (n, out_dim, in_dim), 1.0, jnp.float8_e4m3fn), axes, Quantized)
            blocks = (n, -(-out_dim // quant.FP8_BLOCK), -(-in_dim // quant.FP8_BLOCK))
            self.scale = param(jnp.full(blocks, unit, jnp.float32), axes, Quantized)

    def kernel(self, dtype):
        return kernel(self, dtype)


class Experts(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f, d = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.w1 = ExpertWeights(cfg, e, f, d, rngs, ("exp", "mlp_moe", "embed_moe"))
        self.w2 = ExpertWeights(cfg, e, d, f, rngs, ("exp", "embed_moe", "mlp_moe"))
        self.w3 = ExpertWeights(cfg, e, f, d, rngs, ("exp", "mlp_moe", "embed_moe"))


class SharedExpert(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        f, d = cfg.moe_intermediate_size, cfg.hidden_size
        self.limit = cfg.swiglu_limit
        self.w1 = Linear(d, f, cfg, rngs, ("mlp", "embed"), fp8=True)
        self.w2 = Linear(f, d, cfg, rngs, ("embed", "mlp"), fp8=True)
        self.w3 = Linear(d, f, cfg, rngs, ("mlp", "embed"), fp8=True)

    def __call__(self, x):
        h = clamped_swiglu(self.w1(x, jnp.float32), self.w3(x, jnp.float32), self.limit)
        return self.w2(h.astype(x.dtype))


class Gate(nnx.Module):
    def __init__(self, cfg: ModelConfig, hash_routed: bool, rngs: nnx.Rngs):
        e = cfg.n_routed_experts
        self.weight = param(normal(rngs, (e, cfg.hidden_size), cfg.hidden_size**-0.5, cfg.dtype), (None, "embed"))
        if hash_routed:
            table = jax.random.randint(rngs.params(), (cfg.vocab_size, cfg.num_experts_per_tok), 0, e, jnp.int32)
            self.tid2eid = param(table, (None, None), Constant)
        else:
            self.bias = param(jnp.zeros((e,), jnp.float32), (None,), RouterBias)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = Gate(cfg, kind.hash_routed, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared_experts = SharedExpert(cfg, rngs)

    def route(self, x, token_ids):
        """x: [..., dim], token_ids: [...] -> expert ids and weights [..., k]."""
        cfg = self.cfg
        scores = gate_scores(x, self.gate.weight[...])
        if hasattr(self.gate, "tid2eid"):
            return route(scores, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
                         hash_ids=self.gate.tid2eid[...][token_ids])
        return route(scores, cfg.num_experts_per_tok, cfg.routed_scaling_factor, bias=self.gate.bias[...])

    def __call__(self, x, token_ids):
        """x: [batch, T, dim], token_ids: [batch, T] -> [batch, T, dim]."""
        cfg = self.cfg
        ids, weights = self.route(x, token_ids)
        flat_x = x.reshape(-1, x.shape[-1])
        w1, w2, w3 = (p.kernel(x.dtype) for p in (self.experts.w1, self.experts.w2, self.experts.w3))
        kwargs = dict(limit=cfg.swiglu_limit, act_quant=cfg.quant_sim)
        routed = expert_dispatch(grouped_experts, flat_x, ids.reshape(-1, ids.shape[-1]),
                                 weights.reshape(-1, ids.shape[-1]), w1, w2, w3, **kwargs)
        out = routed.reshape(x.shape) + self.shared_experts(x).astype(jnp.float32)
        return out.astype(x.dtype)
