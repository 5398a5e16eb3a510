"""Expert parallelism: tokens reach the devices that hold their experts and come back combined.

`expert_dispatch` has the signature moe.py calls and three backends, chosen by the
active Layout (`use_rules(..., dispatch=...)`); routing stays in moe.py, so all of
them see the same expert ids and weights. Inside one `shard_map` over the whole
mesh, each expert shard holds E_local = E / |exp| experts (w1, w3: [E_local, F_local,
dim], w2: [E_local, dim, F_local]; F over the `mlp_moe` axes) and runs them with the
local grouped matmul on ids - offset (ids of other shards are ignored by it).

- "gather" (default; jax-llm-examples style): tokens are all-gathered over the
  expert axes that also split the batch, every shard computes its experts' part,
  and the partial outputs are psum-ed (psum-scattered back over the gathered axes).
  No all-to-all, exact, works everywhere; best at decode and small batches.
- "a2a": tokens are sorted by destination shard into a dense [shards, capacity,
  dim] buffer and exchanged with `all_to_all` (XLA:CPU implements it), then back.
  capacity_factor None sizes the buffer for the worst case (never drops); c sizes
  it c x the average load and drops what overflows.
- "ragged": the same exchange with `ragged_all_to_all` (exact sizes, no padding
  on the wire). XLA:CPU does not implement it, so it raises there.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from v4jax import quant
from v4jax.low_rank import LowRank
from v4jax.sharding.rules import Layout, ShardingError, active_rules


def expert_dispatch(local_fn, x, ids, weights, w1, w2, w3, **kwargs):
    """Routed experts for x: [N, dim] with ids, weights: [N, k]; w1, w3: [E, F, dim], w2: [E, dim, F].

    Each weight is an array, a tuple of arrays split alike along (experts, out, in)
    (kept-quantised codes and scales) or a LowRank (a LoRA pair per expert, split with
    its experts). `local_fn(x, ids, weights, w1, w2, w3, n_experts=E_local, **kwargs)` is
    the single-device grouped-expert FFN (moe.grouped_experts). Returns [N, dim] float32.
    """
    n_exp, f = jax.tree.leaves(w1)[0].shape[:2]
    layout = active_rules()
    if layout is None:
        return local_fn(x, ids, weights, w1, w2, w3, n_experts=n_exp, **kwargs)
    plan = _Plan(layout, x, n_exp, f, kwargs.get("act_quant", False))
    body = {"gather": _gather_body, "a2a": _a2a_body, "ragged": _ragged_body}[layout.dispatch]
    tok, exp, ffn = _spec(plan.tok), _spec(plan.exp), _spec(plan.ffn)

    def split(w, spec):
        return w.partition(spec) if isinstance(w, LowRank) else jax.tree.map(lambda _: spec, w)

    fn = jax.shard_map(
        lambda *a: body(plan, local_fn, kwargs, *a), mesh=layout.mesh,
        in_specs=(P(tok, None), P(tok, None), P(tok, None), split(w1, P(exp, ffn, None)),
                  split(w2, P(exp, None, ffn)), split(w3, P(exp, ffn, None))),
        out_specs=P(tok, None), check_vma=False)
    return fn(x, ids, weights.astype(jnp.float32), w1, w2, w3)


def _spec(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def check_expert_layout(layout: Layout, n_experts: int, ffn: int, act_quant: bool) -> None:
    """Raise ShardingError if the routed experts [E, F, dim] cannot run expert-parallel on this layout."""
    what = f"routed experts [E={n_experts}, F={ffn}, dim]"
    layout.spec(("exp", "mlp_moe", None), (n_experts, ffn, 1), what)  # clashes and non-divisible dims
    tok = layout.live_axes("batch") + layout.live_axes("seq")
    ffn_axes = layout.live_axes("mlp_moe")
    if set(ffn_axes) & set(tok):
        raise ShardingError(f"{what}: mesh axes {sorted(set(ffn_axes) & set(tok))} split both the tokens "
                            f"('batch'/'seq') and the expert FFN width ('mlp_moe')")
    f_local = ffn // layout.size(ffn_axes)
    if act_quant and ffn_axes and f_local % quant.FP8_BLOCK:
        raise ShardingError(f"{what}: 'mlp_moe' over {ffn_axes} leaves F_local = {f_local}, not a multiple of "
                            f"the FP8 activation block ({quant.FP8_BLOCK}), so quantisation blocks would straddle devices")


class _Plan:
    """Which mesh axes split tokens, experts and the expert FFN width, checked against the shapes."""

    def __init__(self, layout: Layout, x, n_exp: int, f: int, act_quant: bool):
        check_expert_layout(layout, n_exp, f, act_quant)
        self.layout = layout
        self.tok = layout.live_axes("batch") + layout.live_axes("seq")  # rows of x are [batch, seq] flattened
        self.exp = layout.live_axes("exp")
        self.ffn = layout.live_axes("mlp_moe")
        self.n_shards = layout.size(self.exp)
        self.e_local = n_exp // self.n_shards
        n_tok = layout.size(self.tok)
        if x.shape[0] % n_tok:
            raise ShardingError(f"routed experts: {x.shape[0]} tokens do not divide by token axes {self.tok} "
                                f"of size {n_tok}")
        self.gathered = tuple(a for a in self.exp if a in self.tok)  # shards with different tokens
        self.shared = tuple(a for a in self.exp if a not in self.tok)  # expert shards with the same tokens

    def offset(self):
        """First global expert id of this shard."""
        return jax.lax.axis_index(self.exp) * self.e_local if self.exp else 0


def _gather_body(plan: _Plan, local_fn, kwargs, x, ids, weights, w1, w2, w3):
    if plan.gathered:
        x, ids, weights = (jax.lax.all_gather(v, plan.gathered, axis=0, tiled=True) for v in (x, ids, weights))
    y = local_fn(x, ids - plan.offset(), weights, w1, w2, w3, n_experts=plan.e_local, **kwargs)
    if plan.shared + plan.ffn:
        y = jax.lax.psum(y, plan.shared + plan.ffn)
    if plan.gathered:
        y = jax.lax.psum_scatter(y, plan.gathered, scatter_dimension=0, tiled=True)
    return y


def _split_shared(plan: _Plan, x, ids, weights):
    """Expert shards that hold the same tokens each take their own slice of them (for the exchanges).

    Rows are padded to a multiple of the number of such shards (padding has routing
    weight 0, so it adds nothing); `_join_shared` undoes both.
    """
    if not plan.shared:
        return x, ids, weights
    parts = plan.layout.size(plan.shared)
    n = x.shape[0]
    pad = -n % parts
    x, ids, weights = (jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)) for a in (x, ids, weights))
    rows = (n + pad) // parts
    i = jax.lax.axis_index(plan.shared)
    return tuple(jax.lax.dynamic_slice_in_dim(a, i * rows, rows) for a in (x, ids, weights))


def _join_shared(plan: _Plan, out, n: int):
    if not plan.shared:
        return out
    return jax.lax.all_gather(out, plan.shared, axis=0, tiled=True)[:n]


def _by_destination(plan: _Plan, ids):
    """Sort the (token, expert) assignments by destination shard.

    Returns order [n*k] (assignment index in sorted order), destination shard and
    local expert id of every sorted assignment, and the per-shard counts [S].
    """
    flat = ids.reshape(-1)
    dest = flat // plan.e_local
    order = jnp.argsort(dest, stable=True)
    counts = jnp.bincount(dest, length=plan.n_shards)
    return order, dest[order], (flat % plan.e_local)[order], counts


def _exclusive_cumsum(a, axis=0):
    return jnp.cumsum(a, axis=axis) - a


def _a2a_body(plan: _Plan, local_fn, kwargs, x, ids, weights, w1, w2, w3):
    n_all = x.shape[0]
    x, ids, weights = _split_shared(plan, x, ids, weights)
    n, k = ids.shape
    s = plan.n_shards
    cap = n * k if plan.layout.capacity_factor is None else max(1, math.ceil(plan.layout.capacity_factor * n * k / s))
    order, dest, local_e, counts = _by_destination(plan, ids)
    rank = jnp.arange(n * k) - _exclusive_cumsum(counts)[dest]  # position within its destination's rows
    keep = rank < cap
    slot = jnp.where(keep, dest * cap + rank, s * cap)  # [n*k] row of the send buffer (out of range: dropped)
    token = order // k

    def send(values, fill):
        return jnp.full((s * cap, *values.shape[1:]), fill, values.dtype).at[slot].set(values, mode="drop")

    def exchange(buf):
        return jax.lax.all_to_all(buf, plan.exp, 0, 0, tiled=True)

    recv_x = exchange(send(x[token], 0))
    recv_e = exchange(send(local_e, plan.e_local))  # padding rows name no local expert
    recv_w = exchange(send(weights.reshape(-1)[order], 0.0))
    y = local_fn(recv_x, recv_e[:, None], recv_w[:, None], w1, w2, w3, n_experts=plan.e_local, **kwargs)
    if plan.ffn:
        y = jax.lax.psum(y, plan.ffn)
    back = exchange(y)[jnp.minimum(slot, s * cap - 1)]
    out = jnp.zeros((n, x.shape[-1]), jnp.float32).at[token].add(jnp.where(keep[:, None], back, 0.0))
    return _join_shared(plan, out, n_all)


def _check_ragged_supported(plan: _Plan):
    platform = plan.layout.mesh.devices.flat[0].platform
    if platform == "cpu":
        raise ShardingError("expert dispatch 'ragged' needs ragged_all_to_all, which XLA:CPU does not implement "
                            "(jax#34755); use dispatch='gather' or 'a2a' on CPU")


def _ragged_body(plan: _Plan, local_fn, kwargs, x, ids, weights, w1, w2, w3):
    _check_ragged_supported(plan)
    n_all = x.shape[0]
    x, ids, weights = _split_shared(plan, x, ids, weights)
    n, k = ids.shape
    s = plan.n_shards
    # Receive buffer: worst case (every shard sends all its rows here) unless a capacity is set.
    cap = s * n * k if plan.layout.capacity_factor is None else max(1, math.ceil(plan.layout.capacity_factor * n * k))
    order, _, local_e, counts = _by_destination(plan, ids)
    me = jax.lax.axis_index(plan.exp)
    counts_all = jax.lax.all_gather(counts, plan.exp, axis=0, tiled=False)  # [S, S]: row i sends to column j
    # Each receiver fills its buffer from senders 0, 1, ... and drops what overflows: the same
    # clipped matrix on every shard, so senders and receivers agree on sizes and offsets.
    allowed = jnp.clip(cap - _exclusive_cumsum(counts_all, axis=0), 0, counts_all)
    send_offsets = _exclusive_cumsum(counts)  # my rows for shard j start here (sorted by destination)
    land_offsets = _exclusive_cumsum(allowed, axis=0)[me]  # where they land on shard j
    recv_sizes = allowed[:, me]
    recv_offsets = _exclusive_cumsum(recv_sizes)

    def go(values, fill):
        out = jnp.full((cap, *values.shape[1:]), fill, values.dtype)
        return jax.lax.ragged_all_to_all(values, out, send_offsets, allowed[me], land_offsets, recv_sizes,
                                         axis_name=plan.exp)

    recv_x = go(x[order // k], 0)
    recv_e = go(local_e, plan.e_local)
    recv_w = go(weights.reshape(-1)[order], 0.0)
    y = local_fn(recv_x, recv_e[:, None], recv_w[:, None], w1, w2, w3, n_experts=plan.e_local, **kwargs)
    if plan.ffn:
        y = jax.lax.psum(y, plan.ffn)
    # Back to where each row came from: sender j's rows for me started at its send offset for me.
    origin = _exclusive_cumsum(counts_all, axis=1)[:, me]
    back = jax.lax.ragged_all_to_all(y, jnp.zeros((n * k, y.shape[-1]), y.dtype), recv_offsets, recv_sizes,
                                     origin, allowed[me], axis_name=plan.exp)
    out = jnp.zeros((n, x.shape[-1]), jnp.float32).at[order // k].add(back)
    return _join_shared(plan, out, n_all)
