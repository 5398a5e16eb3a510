"""Decode state (spec §2.8): per-layer caches preallocated for a maximum length.

| layer      | arrays                                                                    |
|------------|---------------------------------------------------------------------------|
| every      | window [batch, W, d] ring buffer, slot = position mod W                   |
| ratio m>0  | entries [batch, max_len/m, d]; kv_state, score_state [batch, m or 2m, κ·d] |
| ratio 4    | index_keys [batch, max_len/4, d_I]; index_kv_state, index_score_state     |

The state is a plain pytree: {"pos": [batch] tokens seen so far, "layers": per scan
segment a list (one per unit layer) of dicts whose arrays carry a leading
[reps] axis, "mtp": the MTP block's window}. `cache_axes` gives every array its
logical axes so the sharding rules place it like any parameter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.compressor import EMPTY_SCORE
from v4jax.config import LayerKind, ModelConfig

CACHE_AXES = {
    "window": ("cache_batch", None, "cache_kv"),
    "entries": ("cache_batch", "cache_seq", "cache_kv"),
    "kv_state": ("cache_batch", None, None),
    "score_state": ("cache_batch", None, None),
    "index_keys": ("cache_batch", "cache_seq", None),
    "index_kv_state": ("cache_batch", None, None),
    "index_score_state": ("cache_batch", None, None),
}


def n_entries(max_len: int, ratio: int) -> int:
    """Compressed entries a cache of max_len tokens holds (at least one slot, so shapes never vanish)."""
    return max(1, max_len // ratio)


def layer_cache(cfg: ModelConfig, kind: LayerKind, batch: int, max_len: int) -> dict:
    dtype = jnp.dtype(cfg.dtype)
    d = cfg.head_dim
    cache = {"window": jnp.zeros((batch, cfg.sliding_window, d), dtype)}
    m = kind.ratio
    if m:
        slots, width = (2 * m, 2 * d) if kind.overlap else (m, d)
        cache["entries"] = jnp.zeros((batch, n_entries(max_len, m), d), dtype)
        cache["kv_state"] = jnp.zeros((batch, slots, width), jnp.float32)
        cache["score_state"] = jnp.full((batch, slots, width), EMPTY_SCORE, jnp.float32)
    if kind.has_indexer:
        di = cfg.index_head_dim
        cache["index_keys"] = jnp.zeros((batch, n_entries(max_len, m), di), dtype)
        cache["index_kv_state"] = jnp.zeros((batch, 2 * m, 2 * di), jnp.float32)
        cache["index_score_state"] = jnp.full((batch, 2 * m, 2 * di), EMPTY_SCORE, jnp.float32)
    return cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """An empty decode state for `batch` sequences of up to `max_len` tokens."""
    def stacked(kind: LayerKind, reps: int) -> dict:
        one = layer_cache(cfg, kind, batch, max_len)
        return {k: jnp.broadcast_to(v, (reps, *v.shape)) for k, v in one.items()}

    state = {
        "pos": jnp.zeros((batch,), jnp.int32),
        "layers": [[stacked(kind, seg.reps) for kind in seg.unit] for seg in cfg.layer_plan],
    }
    if cfg.num_nextn_predict_layers:
        state["mtp"] = layer_cache(cfg, cfg.layer_kind(cfg.num_hidden_layers), batch, max_len)
    return state


def cache_axes(state: dict) -> dict:
    """Logical axes for every array of a decode state (stacked layer dims are named "layers")."""
    def axes(name: str, ndim: int):
        base = CACHE_AXES[name]
        return ("layers",) * (ndim - len(base)) + base

    out = {"pos": ("cache_batch",),
           "layers": [[{k: axes(k, v.ndim) for k, v in unit.items()} for unit in seg] for seg in state["layers"]]}
    if "mtp" in state:
        out["mtp"] = {k: axes(k, v.ndim) for k, v in state["mtp"].items()}
    return out


def cache_bytes(state: dict) -> int:
    """Bytes held by all cache arrays (the figure benchmarks report per token)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
