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

`init_cache(..., quantized=True)` stores window and entries in the FlashMLA layout
(spec §2.8, §4): per vector the non-RoPE dims as E4M3 codes, one UE8M0 scale per 64
of them, a pad byte to align, the RoPE dims in the model dtype — 584 bytes for
head_dim 512 in bf16 — and indexer keys as packed E2M1 codes + one UE8M0 scale per
32 (68 bytes for 128 dims). With the quantisation-aware simulation on, the values
the model caches are already on these grids, so the layout stores them exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax import quant
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


def kv_row_bytes(cfg: ModelConfig) -> int:
    """Bytes of one packed KV vector: E4M3 non-RoPE dims, their UE8M0 scales, pad, RoPE dims."""
    nope, item = cfg.rope_nope_dim, jnp.dtype(cfg.dtype).itemsize
    head = nope + nope // quant.KV_FP8_BLOCK
    return head + (-head % item) + cfg.qk_rope_head_dim * item


def key_row_bytes(cfg: ModelConfig) -> int:
    """Bytes of one packed indexer key: two E2M1 codes per byte, one UE8M0 scale per 32 dims."""
    return cfg.index_head_dim // 2 + cfg.index_head_dim // quant.FP4_GROUP


def pack_kv(kv, rope_dim: int):
    """kv: [..., d] -> uint8 [..., kv_row_bytes]: the non-RoPE dims FP8-rounded (exact if already on the grid)."""
    codes, scales = quant.encode_blocks(kv[..., :-rope_dim], quant.KV_FP8_BLOCK, "fp8")
    head = [_bytes(codes), _bytes(scales)]
    pad = -(codes.shape[-1] + scales.shape[-1]) % kv.dtype.itemsize
    return jnp.concatenate([*head, jnp.zeros((*kv.shape[:-1], pad), jnp.uint8), _bytes(kv[..., -rope_dim:])], -1)


def unpack_kv(rows, head_dim: int, rope_dim: int, dtype):
    """uint8 [..., kv_row_bytes] -> [..., head_dim] dtype."""
    nope = head_dim - rope_dim
    codes = jax.lax.bitcast_convert_type(rows[..., :nope], jnp.float8_e4m3fn)
    scales = jax.lax.bitcast_convert_type(rows[..., nope:nope + nope // quant.KV_FP8_BLOCK], jnp.float8_e8m0fnu)
    item = jnp.dtype(dtype).itemsize
    rope = rows[..., rows.shape[-1] - rope_dim * item:].reshape(*rows.shape[:-1], rope_dim, item)
    return jnp.concatenate([quant.decode_blocks(codes, scales, dtype), jax.lax.bitcast_convert_type(rope, dtype)], -1)


def pack_keys(keys):
    """keys: [..., d_I] -> uint8 [..., key_row_bytes]: packed E2M1 codes (low nibble = even dim), then scales."""
    codes, scales = quant.encode_blocks(keys, quant.FP4_GROUP, "fp4")
    nibbles = jax.lax.bitcast_convert_type(codes, jnp.uint4).astype(jnp.uint8)
    return jnp.concatenate([nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), _bytes(scales)], -1)


def unpack_keys(rows, index_head_dim: int, dtype):
    """uint8 [..., key_row_bytes] -> [..., index_head_dim] dtype."""
    values = quant.unpack_fp4(rows[..., :index_head_dim // 2])
    scales = jax.lax.bitcast_convert_type(rows[..., index_head_dim // 2:], jnp.float8_e8m0fnu)
    return quant.decode_blocks(values, scales, dtype)


def _bytes(x):
    """[..., n] of a 1-, 2- or 4-byte dtype -> uint8 [..., n * itemsize]."""
    b = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return b.reshape(*x.shape[:-1], -1)


def layer_cache(cfg: ModelConfig, kind: LayerKind, batch: int, max_len: int, quantized: bool = False) -> dict:
    dtype = jnp.dtype(cfg.dtype)
    d = cfg.head_dim

    def rows(n: int, width: int, packed_width: int):
        return jnp.zeros((batch, n, packed_width), jnp.uint8) if quantized else jnp.zeros((batch, n, width), dtype)

    cache = {"window": rows(cfg.sliding_window, d, kv_row_bytes(cfg))}
    m = kind.ratio
    if m:
        slots, width = (2 * m, 2 * d) if kind.overlap else (m, d)
        cache["entries"] = rows(n_entries(max_len, m), d, kv_row_bytes(cfg))
        cache["kv_state"] = jnp.zeros((batch, slots, width), jnp.float32)
        cache["score_state"] = jnp.full((batch, slots, width), EMPTY_SCORE, jnp.float32)
    if kind.has_indexer:
        di = cfg.index_head_dim
        cache["index_keys"] = rows(n_entries(max_len, m), di, key_row_bytes(cfg))
        cache["index_kv_state"] = jnp.zeros((batch, 2 * m, 2 * di), jnp.float32)
        cache["index_score_state"] = jnp.full((batch, 2 * m, 2 * di), EMPTY_SCORE, jnp.float32)
    return cache


def init_cache(cfg: ModelConfig, batch: int, max_len: int, quantized: bool = False) -> dict:
    """An empty decode state for `batch` sequences of up to `max_len` tokens (quantized: FlashMLA layout)."""
    def stacked(kind: LayerKind, reps: int) -> dict:
        one = layer_cache(cfg, kind, batch, max_len, quantized)
        return {k: jnp.broadcast_to(v, (reps, *v.shape)) for k, v in one.items()}

    state = {
        "pos": jnp.zeros((batch,), jnp.int32),
        "layers": [[stacked(kind, seg.reps) for kind in seg.unit] for seg in cfg.layer_plan],
    }
    if cfg.num_nextn_predict_layers:
        state["mtp"] = layer_cache(cfg, cfg.layer_kind(cfg.num_hidden_layers), batch, max_len, quantized)
    return state


class LayerCache:
    """One layer's cache as its attention reads and writes it, in either storage layout.

    `arrays` is the layer's own dict (layer=None) or a scanned stack's dict with the
    layer's index: decode then writes a few rows into the stacked arrays in place,
    instead of copying every layer's whole cache on every token.
    """

    def __init__(self, cfg: ModelConfig, arrays: dict, layer=None):
        self.cfg, self.arrays, self.layer = cfg, dict(arrays), layer

    def _at(self, *index):
        return index if self.layer is None else (self.layer, *index)

    def get(self, name: str):
        """The raw per-layer array (compressor carries)."""
        a = self.arrays[name]
        return a if self.layer is None else a[self.layer]

    def set(self, name: str, value) -> None:
        self.arrays[name] = value if self.layer is None else self.arrays[name].at[self.layer].set(value)

    def read(self, name: str, rows=None):
        """Stored vectors in the model dtype: all [batch, N, w], or those at rows [batch, ...]."""
        if rows is None:
            packed = self.get(name)
        else:
            b = jnp.arange(rows.shape[0]).reshape((-1,) + (1,) * (rows.ndim - 1))
            packed = self.arrays[name][self._at(b, rows)]
        if packed.dtype != jnp.uint8:
            return packed
        cfg = self.cfg
        if name == "index_keys":
            return unpack_keys(packed, cfg.index_head_dim, cfg.dtype)
        return unpack_kv(packed, cfg.head_dim, cfg.qk_rope_head_dim, cfg.dtype)

    def write_rows(self, name: str, rows, index) -> None:
        """rows: [batch, R, w] stored at row index [batch, R]; out-of-range indices are dropped."""
        a = self.arrays[name]
        if a.dtype == jnp.uint8:
            rows = pack_keys(rows) if name == "index_keys" else pack_kv(rows, self.cfg.qk_rope_head_dim)
        b = jnp.arange(rows.shape[0])[:, None]
        self.arrays[name] = a.at[self._at(b, index)].set(rows.astype(a.dtype), mode="drop")


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
    """Bytes held by all cache arrays (concrete, or abstract from jax.eval_shape)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def cache_bytes_per_token(cfg: ModelConfig, max_len: int, quantized: bool = False) -> float:
    """Bytes per token of one sequence's decode state for max_len tokens (from shapes; nothing is allocated)."""
    return cache_bytes(jax.eval_shape(lambda: init_cache(cfg, 1, max_len, quantized))) / max_len


def clear_rows(state: dict, rows) -> dict:
    """The state with sequences rows [batch] bool emptied as init_cache makes them (a batch slot reused)."""
    def clear(name: str, a, axis: int):
        mask = rows.reshape((1,) * axis + (-1,) + (1,) * (a.ndim - axis - 1))
        return jnp.where(mask, jnp.asarray(EMPTY_SCORE if name.endswith("score_state") else 0, a.dtype), a)

    out = {"pos": clear("pos", state["pos"], 0),
           "layers": [[{k: clear(k, v, 1) for k, v in unit.items()} for unit in seg] for seg in state["layers"]]}
    if "mtp" in state:
        out["mtp"] = {k: clear(k, v, 0) for k, v in state["mtp"].items()}
    return out
