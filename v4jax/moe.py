"""Mixture of experts (spec §2.9): sqrt-softplus gate, hash or bias-corrected top-k routing,
clamped SwiGLU experts, one shared expert.

Routing is separate from expert compute so that every dispatch backend (local
grouped matmul here, expert-parallel ones in `v4jax.sharding`) shares it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.balancing import expert_counts, sequence_balance_loss
from v4jax.config import LayerKind, ModelConfig
from v4jax.errors import ConfigError
from v4jax.linear import Linear, random_fp8, unit_scale
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


# ---------------------------------------------------------------------------- routed-expert matmuls
# How the routed experts are multiplied, per backend, for batches with enough (token, expert)
# assignments to fill tiles: "ragged" where `ragged_dot` runs as a grouped GEMM (TPU: Megablox),
# "tiled" where it is lowered densely over all experts (XLA:CPU; GPU by default). Smaller
# batches (decode) take "gather". `ModelConfig.moe_impl` overrides the choice; all three give
# the same result.
MOE_IMPL = {"tpu": "ragged", "gpu": "tiled", "cpu": "tiled"}
MOE_IMPLS = ("ragged", "tiled", "gather")
MAX_TILE = 128  # rows per tile: a full MXU / tensor-core tile
MAX_SLICES = 16  # expert matrices taken one by one rather than by one gather


def tile_rows(n_assign: int, n_experts: int) -> int:
    """Rows per tile: the largest power of two <= MAX_TILE whose padding stays within a third of the work.

    Padding each non-empty expert to a tile multiple adds at most tile - 1 rows per
    expert, and at most min(E, n_assign) experts are non-empty. Larger tiles move
    fewer weight bytes (every tile gathers its expert's matrices), smaller ones
    multiply fewer padding rows.
    """
    busy = min(n_experts, n_assign)
    t = 1
    while t < MAX_TILE and 3 * (2 * t - 1) * busy <= n_assign:
        t *= 2
    return t


def check_impl(impl: str | None) -> None:
    if impl is not None and impl not in MOE_IMPLS:
        raise ConfigError(f"moe_impl = {impl!r}: expected one of {MOE_IMPLS} or None (per backend)")


def choose_impl(impl: str | None, n_assign: int, n_experts: int) -> str:
    """The routed-expert matmul for n_assign (token, expert) assignments over n_experts experts."""
    check_impl(impl)
    if impl is not None:
        return impl
    if tile_rows(n_assign, n_experts) == 1:
        return "gather"
    return MOE_IMPL.get(jax.default_backend(), "tiled")


def _take(w, idx):
    """w[idx] for w: [E, ...], idx: [...] int -> [..., ...].

    A few matrices (decode) are taken as separate dynamic slices: XLA's cost model
    counts a gather fused into its consumer as a read of the whole expert stack, a
    dynamic slice as the slice it reads.
    """
    if idx.size > MAX_SLICES:
        return w[idx]
    flat = idx.reshape(-1)
    taken = [jax.lax.dynamic_index_in_dim(w, flat[j], keepdims=False) for j in range(flat.size)]
    return jnp.stack(taken).reshape(*idx.shape, *w.shape[1:])


def expert_stack(w, dtype):
    """All experts' matrices [E, out, in] in `dtype` from w: [E, out, in] or kept-quantised (codes, scales)."""
    if isinstance(w, tuple):
        return quant.dequant(*w, dtype)
    return w.astype(dtype)


def take_experts(w, idx, dtype):
    """Expert matrices w[idx] in `dtype`: idx [...] int -> [..., out, in].

    Kept-quantised experts are dequantised after the gather, so that only the
    experts taken are decoded (all of them first, once, when idx takes more
    matrices than there are experts).
    """
    if not isinstance(w, tuple):
        return _take(w, idx).astype(dtype)
    codes, scales = w
    if idx.size >= codes.shape[0]:
        return expert_stack(w, dtype)[idx]
    return quant.dequant(_take(codes, idx), _take(scales, idx), dtype)


def ragged_matmul_t(x, w, group_sizes):
    """x: [M, in] rows sorted by group, w: [G, out, in] -> [M, out] float32 (row r uses its group's w)."""
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])
    return jax.lax.ragged_dot_general(x, w.astype(x.dtype), group_sizes, dims, preferred_element_type=jnp.float32)


def _ffn(xs, rw, mm1, mm3, mm2, *, dtype, limit: float, act_quant: bool):
    """The expert FFN on rows already laid out for the matmuls mm1, mm3, mm2: [..., in] -> [..., out] f32.

    xs: [..., dim] one row per assignment (zero rows for padding); rw: [...] routing weights.
    FP8 activation quantisation works per row over the input dim, so padding rows and
    the layout never change a real row's blocks.
    """
    if act_quant:
        xs = quant.fake_quant_fp8(xs, quant.FP8_BLOCK)
    # The reference's expert GEMMs return the activation dtype; the SwiGLU then runs in float32.
    # Explicit roundings: XLA may otherwise fuse a bf16 round trip away (see quant.round_to).
    h = clamped_swiglu(quant.round_to(mm1(xs), dtype), quant.round_to(mm3(xs), dtype), limit)
    # The routing weight scales h before the down projection, as in the reference.
    h = quant.round_to(h * rw[..., None], dtype)
    if act_quant:
        h = quant.fake_quant_fp8(h, quant.FP8_BLOCK)
    return quant.round_to(mm2(h), dtype).astype(jnp.float32)


def sum_slots(y):
    """y: [N, k, dim] -> [N, dim], each token's k expert outputs summed in slot order.

    A chain of adds: XLA:CPU runs a reduce over the short middle axis about 1.7x slower.
    """
    return sum(y[:, j] for j in range(y.shape[1]))


def _ragged_experts(x, ids, weights, w1, w2, w3, n_experts: int, **ffn):
    """Rows sorted by expert, one `ragged_dot` per projection over all experts."""
    n, k = ids.shape
    flat = ids.reshape(-1)
    local = (flat >= 0) & (flat < n_experts)
    order = jnp.argsort(jnp.where(local, flat, n_experts))  # foreign experts sort last
    group_sizes = jnp.bincount(jnp.where(local, flat, n_experts), length=n_experts + 1)[:n_experts]
    mm1, mm3, mm2 = (functools.partial(ragged_matmul_t, w=expert_stack(w, x.dtype), group_sizes=group_sizes)
                     for w in (w1, w3, w2))
    y = _ffn(x[order // k], weights.reshape(-1)[order], mm1, mm3, mm2, dtype=x.dtype, **ffn)
    y = jnp.where(local[order][:, None], y, 0.0)
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[order // k].add(y)


def _tiled_experts(x, ids, weights, w1, w2, w3, n_experts: int, **ffn):
    """Assignments sorted by expert, each expert's rows padded to a tile multiple, one batched
    matmul over the tiles with each tile's expert matrices (gathered per tile, not per row).

    The tile count is static: sum_e ceil(n_e / t) <= (n*k + busy*(t-1)) / t for
    busy = min(E, n*k) non-empty experts, so no assignment is ever dropped.
    """
    n, k = ids.shape
    nk = n * k
    t = tile_rows(nk, n_experts)
    n_tiles = (nk + min(n_experts, nk) * (t - 1)) // t
    rows = n_tiles * t
    flat = ids.reshape(-1)
    expert = jnp.where((flat >= 0) & (flat < n_experts), flat, n_experts)  # foreign: E, sorted last
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=n_experts + 1)[:n_experts]
    padded = -(-sizes // t) * t
    ends = jnp.cumsum(padded)
    sorted_e = expert[order]
    e = jnp.minimum(sorted_e, n_experts - 1)
    rank = jnp.arange(nk) - (jnp.cumsum(sizes) - sizes)[e]
    # slot[a]: the padded row of assignment a (rows for foreign ones: out of range).
    slot = jnp.zeros(nk, jnp.int32).at[order].set(jnp.where(sorted_e < n_experts, ends[e] - padded[e] + rank, rows))
    src = jnp.full(rows, nk, jnp.int32).at[slot].set(jnp.arange(nk, dtype=jnp.int32), mode="drop")  # nk: padding
    real = src < nk
    xs = jnp.where(real[:, None], x[jnp.minimum(src // k, n - 1)], 0).reshape(n_tiles, t, -1)  # [tiles, t, dim]
    rw = jnp.where(real, weights.reshape(-1)[jnp.minimum(src, nk - 1)], 0.0).reshape(n_tiles, t)
    # Tiles past the last expert's are all padding; they take the last expert's matrices.
    tile_expert = jnp.minimum(jnp.searchsorted(ends, jnp.arange(n_tiles) * t, side="right"), n_experts - 1)

    def tile(one):
        xs_t, rw_t, expert_t = one  # [t, dim], [t], []

        def mm(w):
            wt = take_experts(w, expert_t, x.dtype)  # [out, in]
            return lambda a: jnp.einsum("ri,oi->ro", a, wt, preferred_element_type=jnp.float32)

        return _ffn(xs_t, rw_t, mm(w1), mm(w3), mm(w2), dtype=x.dtype, **ffn)

    # Tiles run one after another (lax.map), each gathering its expert's matrices just before its
    # matmuls, so they are still in cache; a batch of tiles with a batch of gathered matrices was
    # slower on XLA:CPU (the audit's MoE layer: 10-tile chunks ~10-25% slower at E = 8 .. 256,
    # 256 MiB chunks ~5x slower at E = 256).
    y = jax.lax.map(tile, (xs, rw, tile_expert))
    y = y.reshape(rows, -1)
    back = jnp.take(y, slot, axis=0, mode="fill", fill_value=0.0)  # [n*k, dim]; foreign rows 0
    return sum_slots(back.reshape(n, k, -1))


def _gathered_experts(x, ids, weights, w1, w2, w3, n_experts: int, **ffn):
    """Each assignment with its own expert's matrices: reads (and decodes) only the selected experts."""
    local = (ids >= 0) & (ids < n_experts)
    e = jnp.where(local, ids, 0)
    x = jnp.broadcast_to(x[:, None], (*ids.shape, x.shape[-1]))  # [N, k, dim]

    def mm(w):
        wt = take_experts(w, e, x.dtype)  # [N, k, out, in]
        return lambda a: jnp.einsum("nki,nkoi->nko", a, wt, preferred_element_type=jnp.float32)

    y = _ffn(x, weights, mm(w1), mm(w3), mm(w2), dtype=x.dtype, **ffn)
    return sum_slots(jnp.where(local[..., None], y, 0.0))


_IMPLS = {"ragged": _ragged_experts, "tiled": _tiled_experts, "gather": _gathered_experts}


def grouped_experts(x, ids, weights, w1, w2, w3, *, limit: float, act_quant: bool, n_experts: int,
                    impl: str | None = None):
    """Routed-expert FFN, work proportional to the (token, expert) assignments (impl: see MOE_IMPL).

    x: [N, dim]; ids, weights: [N, k]; w1, w3: [E, F, dim]; w2: [E, dim, F] (E local
    experts, each an array or kept-quantised (codes, scales); ids outside 0..E-1
    contribute nothing). Returns [N, dim] float32, the weighted sum over each token's experts.
    """
    fn = _IMPLS[choose_impl(impl, ids.size, n_experts)]
    return fn(x, jnp.asarray(ids), weights.astype(jnp.float32), w1, w2, w3, n_experts, limit=limit,
              act_quant=act_quant)


class ExpertWeights(nnx.Module):
    """One projection of all routed experts: [E, out, in] (or its FP4/FP8 codes + scales)."""

    def __init__(self, cfg: ModelConfig, n: int, out_dim: int, in_dim: int, rngs: nnx.Rngs, axes):
        if not cfg.quantized:
            self.weight = param(normal(rngs, (n, out_dim, in_dim), in_dim**-0.5, cfg.dtype), axes)
        elif cfg.expert_dtype == "fp4":
            codes = jax.random.randint(rngs.params(), (n, out_dim, in_dim // 2), -128, 128, jnp.int32)
            self.weight = param(codes.astype(jnp.int8), axes, Quantized)
            scale = unit_scale(in_dim) / 4  # E2M1 codes reach 6, E4M3 ones far more
            self.scale = param(jnp.full((n, out_dim, in_dim // quant.FP4_GROUP), scale, jnp.float32), axes,
                               Quantized)
        else:
            self.weight, self.scale = random_fp8(rngs, (n, out_dim, in_dim), axes)

    def operand(self):
        """What the expert matmuls take: the weight, or (codes, scales) when kept quantised; with a
        LoRA adapter (v4jax.lora) the decoded weight plus its B A, one pair per expert."""
        w = (self.weight[...], self.scale[...]) if hasattr(self, "scale") else self.weight[...]
        if hasattr(self, "lora"):
            return self.lora.adapt(expert_stack(w, self.lora.a.get_value().dtype))
        return w


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
        # GEMM outputs rounded to the activation dtype, as the reference's; the SwiGLU in float32.
        h = clamped_swiglu(quant.round_to(self.w1(x, jnp.float32), x.dtype),
                           quant.round_to(self.w3(x, jnp.float32), x.dtype), self.limit)
        return self.w2(quant.round_to(h, x.dtype))


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
        check_impl(cfg.moe_impl)  # at construction, not first at trace time
        self.cfg = cfg
        self.gate = Gate(cfg, kind.hash_routed, rngs)
        self.experts = Experts(cfg, rngs)
        self.shared_experts = SharedExpert(cfg, rngs)

    def route(self, scores, token_ids):
        """scores: [..., E] gate affinities, token_ids: [...] -> expert ids and weights [..., k]."""
        cfg = self.cfg
        if hasattr(self.gate, "tid2eid"):
            return route(scores, cfg.num_experts_per_tok, cfg.routed_scaling_factor,
                         hash_ids=self.gate.tid2eid[...][token_ids])
        return route(scores, cfg.num_experts_per_tok, cfg.routed_scaling_factor, bias=self.gate.bias[...])

    def __call__(self, x, token_ids, valid=None):
        """x: [batch, T, dim], token_ids: [batch, T] -> [batch, T, dim].

        With `valid` ([batch, T] int: 0 for tokens that do not count, else the token's sequence
        in its row, i.e. its packed document) also the layer's routing statistics for training
        (v4jax.balancing): {"counts": [E] assignments per expert over the real tokens, "balance":
        the sequence-wise balance loss over those sequences, 0 for hash-routed layers}.
        """
        cfg = self.cfg
        w_gate = self.gate.weight[...]
        if hasattr(self.gate, "lora"):  # a LoRA adapter (v4jax.lora), folded into the [E, dim] weight
            w_gate = self.gate.lora.adapt(w_gate)
        scores = gate_scores(x, w_gate)
        ids, weights = self.route(scores, token_ids)
        flat_x = x.reshape(-1, x.shape[-1])
        w1, w2, w3 = (p.operand() for p in (self.experts.w1, self.experts.w2, self.experts.w3))
        kwargs = dict(limit=cfg.swiglu_limit, act_quant=cfg.quant_sim, impl=cfg.moe_impl)
        routed = expert_dispatch(grouped_experts, flat_x, ids.reshape(-1, ids.shape[-1]),
                                 weights.reshape(-1, ids.shape[-1]), w1, w2, w3, **kwargs)
        # Explicit rounding: the bf16 output feeds float32 mHC math, and under XLA's default excess
        # precision a fusion with the routed sum (tiled, gather) would skip a plain cast's rounding.
        out = quant.round_to(routed.reshape(x.shape) + self.shared_experts(x).astype(jnp.float32), x.dtype)
        if valid is None:
            return out
        hash_routed = hasattr(self.gate, "tid2eid")
        balance = jnp.zeros((), jnp.float32) if hash_routed else sequence_balance_loss(scores, ids, valid)
        return out, {"counts": expert_counts(ids, cfg.n_routed_experts, valid != 0), "balance": balance}
