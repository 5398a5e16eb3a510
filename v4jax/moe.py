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
from jax.ad_checkpoint import checkpoint_name

from v4jax import quant
from v4jax.balancing import expert_counts, sequence_balance_loss
from v4jax.config import MOE_IMPLS, LayerKind, ModelConfig
from v4jax.errors import ConfigError
from v4jax.linear import Linear, random_fp8, unit_scale
from v4jax.low_rank import LowRank, times
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
# assignments to fill tiles: "ragged" where `ragged_dot` runs as a grouped GEMM (TPU: Megablox);
# elsewhere it is lowered densely over all experts. "looped" (XLA:CPU) walks the experts that have
# rows, each decoding its matrices once; "tiled" (GPU, where a data-dependent loop would wait on the
# host every iteration) runs a static number of tiles. Smaller batches (decode) take "gather".
# `ModelConfig.moe_impl` overrides the choice; all four give the same result.
MOE_IMPL = {"tpu": "ragged", "gpu": "tiled", "cpu": "looped"}
MAX_TILE = 128  # rows per tile: a full MXU / tensor-core tile
MAX_SLICES = 16  # expert matrices taken one by one rather than by one gather
MAX_ASSIGNMENTS = 1 << 16  # (token, expert) assignments of one expert pass (see grouped_experts)


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
    """The matrices [..., out, in] in `dtype` of an operand: an array, kept-quantised (codes,
    scales) or a LowRank (its base decoded, its pair cast)."""
    if isinstance(w, LowRank):
        return LowRank(expert_stack(w.w, dtype), w.a.astype(dtype), w.b.astype(dtype), w.scale)
    if isinstance(w, tuple):
        return quant.dequant(*w, dtype)
    return w.astype(dtype)


def take_experts(w, idx, dtype):
    """Expert matrices w[idx] in `dtype`: idx [...] int -> [..., out, in] (a LowRank: its pairs too).

    Kept-quantised experts are dequantised after the gather, so that only the
    experts taken are decoded (all of them first, once, when idx takes more
    matrices than there are experts).
    """
    if isinstance(w, LowRank):
        return LowRank(take_experts(w.w, idx, dtype), *(_take(m, idx).astype(dtype) for m in (w.a, w.b)), w.scale)
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


def _rows_t(a, w):
    """a: [rows, in], w: [out, in] -> [rows, out] float32."""
    return jnp.einsum("ri,oi->ro", a, w, preferred_element_type=jnp.float32)


def _row_matmul(w):
    """One expert's w: [out, in] (or a LowRank of them) -> (a: [rows, in] -> [rows, out] float32)."""
    return times(_rows_t, w)


def _ffn_in(xs, mm1, mm3, *, dtype, act_quant: bool):
    """The expert FFN's input projections on rows laid out for mm1, mm3: [..., dim] -> g, v [..., F] in `dtype`.

    FP8 activation quantisation works per row over the input dim, so padding rows and
    the layout never change a real row's blocks.
    """
    if act_quant:
        xs = quant.fake_quant_fp8(xs, quant.FP8_BLOCK)
    # The reference's expert GEMMs return the activation dtype; the SwiGLU then runs in float32.
    # Explicit roundings: XLA may otherwise fuse a bf16 round trip away (see quant.round_to).
    g, v = quant.round_to(mm1(xs), dtype), quant.round_to(mm3(xs), dtype)
    return checkpoint_name(g, "expert_hidden"), checkpoint_name(v, "expert_hidden")


def _ffn_out(g, v, rw, mm2, *, dtype, limit: float, act_quant: bool):
    """The rest of the expert FFN: g, v [..., F] and routing weights rw [...] -> [..., out] float32."""
    # The routing weight scales h before the down projection, as in the reference.
    h = quant.round_to(clamped_swiglu(g, v, limit) * rw[..., None], dtype)
    if act_quant:
        h = quant.fake_quant_fp8(h, quant.FP8_BLOCK)
    return quant.round_to(mm2(checkpoint_name(h, "expert_hidden")), dtype).astype(jnp.float32)


def _ffn(xs, rw, mm1, mm3, mm2, *, dtype, limit: float, act_quant: bool):
    """The expert FFN on rows xs [..., dim] (zero rows for padding) with routing weights rw [...],
    laid out for the matmuls mm1, mm3, mm2 -> [..., out] float32."""
    g, v = _ffn_in(xs, mm1, mm3, dtype=dtype, act_quant=act_quant)
    return _ffn_out(g, v, rw, mm2, dtype=dtype, limit=limit, act_quant=act_quant)


def sum_slots(y):
    """y: [N, k, dim] -> [N, dim], each token's k expert outputs summed in slot order.

    A chain of adds: XLA:CPU runs a reduce over the short middle axis about 1.7x slower.
    """
    return sum(y[:, j] for j in range(y.shape[1]))


def sort_by_expert(ids, n_experts: int):
    """ids: [N, k] -> (expert, order, sizes): each assignment's expert [N*k] (ids outside
    0..E-1 become E), the permutation sorting assignments by expert (stable; foreign ones
    last) and the assignments per expert [E]."""
    flat = ids.reshape(-1)
    expert = jnp.where((flat >= 0) & (flat < n_experts), flat, n_experts)
    order = jnp.argsort(expert, stable=True)
    return expert, order, jnp.bincount(expert, length=n_experts + 1)[:n_experts]


def _ragged_experts(x, ids, weights, w1, w2, w3, n_experts: int, **ffn):
    """Rows sorted by expert, one `ragged_dot` per projection over all experts."""
    n, k = ids.shape
    expert, order, group_sizes = sort_by_expert(ids, n_experts)
    mm1, mm3, mm2 = (times(functools.partial(ragged_matmul_t, group_sizes=group_sizes), expert_stack(w, x.dtype))
                     for w in (w1, w3, w2))
    y = _ffn(x[order // k], weights.reshape(-1)[order], mm1, mm3, mm2, dtype=x.dtype, **ffn)
    y = jnp.where((expert[order] < n_experts)[:, None], y, 0.0)
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
    expert, order, sizes = sort_by_expert(ids, n_experts)  # foreign assignments: expert E, sorted last
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
            return _row_matmul(take_experts(w, expert_t, x.dtype))  # [out, in]

        return _ffn(xs_t, rw_t, mm(w1), mm(w3), mm(w2), dtype=x.dtype, **ffn)

    # The backward pass keeps each tile's hidden activations (see _ffn_in) and takes its expert
    # matrices from the stack again: kept, they would be [tiles, out, in] per projection.
    tile = jax.checkpoint(tile, policy=jax.checkpoint_policies.save_only_these_names("expert_hidden"))

    # Tiles run one after another (lax.map), each gathering its expert's matrices just before its
    # matmuls, so they are still in cache; a batch of tiles with a batch of gathered matrices was
    # slower on XLA:CPU (the audit's MoE layer: 10-tile chunks ~10-25% slower at E = 8 .. 256,
    # 256 MiB chunks ~5x slower at E = 256).
    y = jax.lax.map(tile, (xs, rw, tile_expert))
    y = y.reshape(rows, -1)
    back = jnp.take(y, slot, axis=0, mode="fill", fill_value=0.0)  # [n*k, dim]; foreign rows 0
    return sum_slots(back.reshape(n, k, -1))


# The looped path's chunk widths, widest first (see _each_chunk). On XLA:CPU a 256-row chunk runs
# ~1.6x faster per row than a 128-row one (the matmul is split over the cores), and one chunk
# padded up to a width is faster than the two narrower chunks that would fit exactly.
CHUNK_ROWS = (256, 128, 64, 32, 16, 8)


def _each_expert(sizes, expert_fn, carry):
    """carry = expert_fn(e, start, end, carry) for each expert with rows, in id order; its rows
    of the expert-sorted layout are [start, end)."""
    ends = jnp.cumsum(sizes)
    busy = jnp.nonzero(sizes, size=sizes.shape[0], fill_value=0)[0]

    def one(i, carry):
        e = busy[i]
        return expert_fn(e, ends[e] - sizes[e], ends[e], carry)

    return jax.lax.fori_loop(0, jnp.count_nonzero(sizes), one, carry)


def _each_chunk(start, end, compute, apply, carry):
    """Rows [start, end) in chunks: full CHUNK_ROWS[0]-row ones, then what is left in one chunk of
    the narrowest width that covers it (per-call costs on small chunks outweigh a few padding rows).

    compute(off, width, rows_left) -> (rows, rest) with `rows` arrays [width, ...];
    apply(carry, off, rows, rest) -> carry. The last chunk's rows past `end`, and its `rows`
    padded to CHUNK_ROWS[0] (the branches must agree), land on rows of the sorted layout that
    a later expert writes again, or past the assignments.
    """
    full = CHUNK_ROWS[0]
    n_full = (end - start) // full

    def one(i, carry):
        off = start + i * full
        return apply(carry, off, *compute(off, full, full))

    carry = jax.lax.fori_loop(0, n_full, one, carry)
    off = start + n_full * full
    left = end - off

    def branch(width):
        def run():
            rows, rest = compute(off, width, left)
            pad = lambda a: jnp.pad(a, [(0, full - width)] + [(0, 0)] * (a.ndim - 1))
            return jax.tree.map(pad, rows), rest
        return run

    def nothing():  # no rows left: zeros of the branches' shapes
        return jax.tree.map(jnp.zeros_like, jax.eval_shape(branch(CHUNK_ROWS[-1])))

    which = sum((left <= w).astype(jnp.int32) for w in CHUNK_ROWS[1:]) + (left == 0)
    return apply(carry, off, *jax.lax.switch(which, [*map(branch, CHUNK_ROWS), nothing]))


def _looped_forward(ffn, xs, rw, ws, sizes, keep_inputs: bool):
    """The FFN of every sorted row: ys [R, dim] float32 (rows past the assignments 0) and, with
    keep_inputs, the rows' g, v [R, F] (what the backward pass reads)."""
    dtype, limit, act_quant = ffn
    total = jnp.sum(sizes)

    def expert(e, start, end, bufs):
        w1, w2, w3 = (take_experts(w, e, dtype) for w in ws)  # this expert's only, decoded once

        def compute(off, width, rows_left):
            xc, rc = (jax.lax.dynamic_slice_in_dim(a, off, width) for a in (xs, rw))
            g, v = _ffn_in(xc, _row_matmul(w1), _row_matmul(w3), dtype=dtype, act_quant=act_quant)
            y = _ffn_out(g, v, rc, _row_matmul(w2), dtype=dtype, limit=limit, act_quant=act_quant)
            return ((y, g, v) if keep_inputs else (y,)), ()

        def apply(bufs, off, rows, _):
            return tuple(jax.lax.dynamic_update_slice_in_dim(b, r, off, 0) for b, r in zip(bufs, rows))

        return _each_chunk(start, end, compute, apply, bufs)

    f = jax.tree.leaves(ws[0])[0].shape[1]  # w1: [E, F, dim], or its codes
    bufs = (jnp.zeros((xs.shape[0], xs.shape[1]), jnp.float32),)
    if keep_inputs:
        bufs += (jnp.zeros((xs.shape[0], f), dtype),) * 2
    bufs = _each_expert(sizes, expert, bufs)
    ys = jnp.where((jnp.arange(xs.shape[0]) < total)[:, None], bufs[0], 0.0)
    return ys, bufs[1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _looped_ffn(ffn, xs, rw, ws, sizes):
    """xs: [R, dim] rows sorted by expert (R = assignments + CHUNK_ROWS[0] zero rows), rw: [R]
    routing weights, ws: (w1, w2, w3) operands, sizes: [E] rows per expert -> [R, dim] float32."""
    return _looped_forward(ffn, xs, rw, ws, sizes, keep_inputs=False)[0]


def _is_primal(p) -> bool:
    return isinstance(p, jax.custom_derivatives.CustomVJPPrimal)


def _looped_ffn_fwd(ffn, xs, rw, ws, sizes):
    # symbolic_zeros: each primal says whether it is differentiated. The weight leaves that are
    # not (a frozen base under LoRA, kept-quantised codes and scales) get no gradient computed or stored.
    trained = tuple(p.perturbed for p in jax.tree.leaves(ws, is_leaf=_is_primal))
    xs, rw, ws, sizes = jax.tree.map(lambda p: p.value, (xs, rw, ws, sizes), is_leaf=_is_primal)
    ys, (g, v) = _looped_forward(ffn, xs, rw, ws, sizes, keep_inputs=True)
    return ys, (xs, rw, ws, sizes, g, v, trained)


def _looped_ffn_bwd(ffn, res, dys):
    """The same loop backwards: each chunk's input and weight gradients from its kept g, v
    (XLA drops the forward matmuls that jax.vjp traces and nothing reads); gradients of the
    differentiated weight leaves (a LoRA pair's, a trained stack's) summed per expert in float32."""
    dtype, limit, act_quant = ffn
    xs, rw, ws, sizes, g_all, v_all, trained = res
    if isinstance(dys, jax.custom_derivatives.SymbolicZero):
        dys = jnp.zeros(dys.shape, dys.dtype)
    leaves, treedef = jax.tree.flatten(ws)

    def expert(e, start, end, carry):
        dxs, drw, dws = carry
        own = [jax.lax.dynamic_index_in_dim(leaf, e, keepdims=False) for leaf in leaves]

        def matrices(trained_slices):  # this expert's decoded (w1, w2, w3), its trained slices as given
            it = iter(trained_slices)
            return [expert_stack(w, dtype)
                    for w in jax.tree.unflatten(treedef, [next(it) if t else o for o, t in zip(own, trained)])]

        tr = [o for o, t in zip(own, trained) if t]

        def compute(off, width, rows_left):
            xc, rc, gc, vc, dyc = (jax.lax.dynamic_slice_in_dim(a, off, width) for a in (xs, rw, g_all, v_all, dys))
            dyc = jnp.where((jnp.arange(width) < rows_left)[:, None], dyc, 0.0)  # rows of later experts
            _, out_vjp = jax.vjp(lambda g, v, r, tr: _ffn_out(g, v, r, _row_matmul(matrices(tr)[1]), dtype=dtype,
                                                              limit=limit, act_quant=act_quant), gc, vc, rc, tr)
            dg, dv, drc, dtr_out = out_vjp(dyc)
            _, in_vjp = jax.vjp(lambda x, tr: _ffn_in(x, *(_row_matmul(m) for m in matrices(tr)[::2]), dtype=dtype,
                                                      act_quant=act_quant), xc, tr)
            dxc, dtr_in = in_vjp((dg, dv))
            return (dxc, drc), [(a + b).astype(jnp.float32) for a, b in zip(dtr_in, dtr_out)]

        def apply(carry, off, rows, dtr):
            dxs, drw, acc = carry
            dxs, drw = (jax.lax.dynamic_update_slice_in_dim(b, r, off, 0) for b, r in zip((dxs, drw), rows))
            return dxs, drw, [a + b for a, b in zip(acc, dtr)]

        zero = [jnp.zeros(o.shape, jnp.float32) for o in tr]
        dxs, drw, acc = _each_chunk(start, end, compute, apply, (dxs, drw, zero))
        return dxs, drw, [jax.lax.dynamic_update_index_in_dim(dw, d, e, 0) for dw, d in zip(dws, acc)]

    dws = [jnp.zeros(leaf.shape, jnp.float32) for leaf, t in zip(leaves, trained) if t]
    dxs, drw, dws = _each_expert(sizes, expert, (jnp.zeros_like(xs), jnp.zeros_like(rw), dws))
    it = iter(dws)
    dws = jax.tree.unflatten(treedef, [next(it).astype(leaf.dtype) if t else None for leaf, t in zip(leaves, trained)])
    return dxs, drw, dws, None


_looped_ffn.defvjp(_looped_ffn_fwd, _looped_ffn_bwd, symbolic_zeros=True)


def _looped_experts(x, ids, weights, w1, w2, w3, n_experts: int, *, limit: float, act_quant: bool):
    """Assignments sorted by expert; a loop over the experts with rows, each decoding its own
    matrices once and multiplying its rows in chunks (_each_chunk): per expert fewer padding rows
    than half its last chunk's width (or 8), weight bytes those of the experts used, and no dense
    matmul over all experts in either direction."""
    n, k = ids.shape
    expert, order, sizes = sort_by_expert(ids, n_experts)
    pad = CHUNK_ROWS[0]  # chunks starting at the last rows stay inside the buffers
    xs = jnp.pad(x[order // k], ((0, pad), (0, 0)))
    rw = jnp.pad(weights.reshape(-1)[order], (0, pad))
    ys = _looped_ffn((x.dtype, limit, act_quant), xs, rw, (w1, w2, w3), sizes)
    slot = jnp.zeros(n * k, jnp.int32).at[order].set(jnp.arange(n * k, dtype=jnp.int32))
    return sum_slots(ys[slot].reshape(n, k, -1))  # foreign assignments sort past the rows used: 0


def _gathered_experts(x, ids, weights, w1, w2, w3, n_experts: int, **ffn):
    """Each assignment with its own expert's matrices: reads (and decodes) only the selected experts."""
    local = (ids >= 0) & (ids < n_experts)
    e = jnp.where(local, ids, 0)
    x = jnp.broadcast_to(x[:, None], (*ids.shape, x.shape[-1]))  # [N, k, dim]

    def mm(w):  # each assignment's matrices [N, k, out, in]
        return times(lambda a, wt: jnp.einsum("nki,nkoi->nko", a, wt, preferred_element_type=jnp.float32),
                     take_experts(w, e, x.dtype))

    y = _ffn(x, weights, mm(w1), mm(w3), mm(w2), dtype=x.dtype, **ffn)
    return sum_slots(jnp.where(local[..., None], y, 0.0))


_IMPLS = {"ragged": _ragged_experts, "tiled": _tiled_experts, "looped": _looped_experts,
          "gather": _gathered_experts}


def grouped_experts(x, ids, weights, w1, w2, w3, *, limit: float, act_quant: bool, n_experts: int,
                    impl: str | None = None):
    """Routed-expert FFN, work proportional to the (token, expert) assignments (impl: see MOE_IMPL).

    x: [N, dim]; ids, weights: [N, k]; w1, w3: [E, F, dim]; w2: [E, dim, F] (E local
    experts, each an array, kept-quantised (codes, scales) or a LowRank; ids outside 0..E-1
    contribute nothing). Returns [N, dim] float32, the weighted sum over each token's experts.

    More than MAX_ASSIGNMENTS assignments run in token chunks, one after another, each
    recomputed in the backward pass: a long training sequence's expert temporaries (rows
    sorted and padded per expert, [rows, dim] float32 outputs and their gradients) are one
    chunk's, not the sequence's. A token's output does not depend on the chunking.
    """
    ids, weights = jnp.asarray(ids), jnp.asarray(weights, jnp.float32)
    n, k = ids.shape
    chunk = max(1, MAX_ASSIGNMENTS // k)

    def run(x, ids, weights):
        fn = _IMPLS[choose_impl(impl, ids.size, n_experts)]
        return fn(x, ids, weights, w1, w2, w3, n_experts, limit=limit, act_quant=act_quant)

    if n <= chunk:
        return run(x, ids, weights)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n  # padding tokens route to no local expert (-1): they add nothing
    split = lambda a, fill: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill).reshape(
        n_chunks, chunk, *a.shape[1:])
    y = jax.lax.map(jax.checkpoint(lambda c: run(*c)), (split(x, 0), split(ids, -1), split(weights, 0)))
    return y.reshape(n_chunks * chunk, -1)[:n]


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
        LoRA adapter (v4jax.lora) a LowRank of that and its pairs, one per expert."""
        w = (self.weight[...], self.scale[...]) if hasattr(self, "scale") else self.weight[...]
        if hasattr(self, "lora"):
            return LowRank(w, self.lora.a[...], self.lora.b[...], self.lora.scale)
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
