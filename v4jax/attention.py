"""Hybrid attention of one block (spec §2.3–2.7).

Every layer attends over a 128-token sliding window of raw KV. CSA layers (ratio 4)
add the compressed entries their lightning indexer picks (gathered, not masked);
HCA layers add every compressed entry; window-only layers add nothing. One softmax
with a learned per-head sink covers all of it. K = V: one shared 512-wide head.

One code path serves a whole sequence, chunked prefill and decode: a chunk of T
tokens at positions start + t (per sequence, valid for t < lengths) reads and
updates the layer's cache (window ring buffer, compressed entries, compressor
carries, indexer keys); a whole-sequence forward is a chunk over a fresh cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.cache import LayerCache
from v4jax.compressor import Compressor
from v4jax.config import ModelConfig
from v4jax.indexer import Indexer, indexer_scores, select_topk
from v4jax.linear import Linear
from v4jax.norms import RMSNorm, rms_normalize
from v4jax.params import normal, param
from v4jax.rope import apply_rope, layer_inv_freq
from v4jax.sharding import constrain


def sink_attention(q, parts, sink, scale: float):
    """Softmax attention whose denominator also counts e^sink (spec §2.3).

    q: [batch, Tq, H, d]; parts: list of (kv, mask) where kv is shared by the queries
    ([batch, N, d], mask [batch, Tq, N]) or per query ([batch, Tq, N, d], mask
    [batch, Tq, N]); sink: [H] raw logits. Returns [batch, Tq, H, d] float32.
    """
    logits = []
    for kv, mask in parts:
        spec = "bqhd,bqnd->bqhn" if kv.ndim == 4 else "bqhd,bnd->bqhn"
        s = jnp.einsum(spec, q, kv, preferred_element_type=jnp.float32) * scale
        logits.append(jnp.where(mask[:, :, None, :], s, -jnp.inf))
    sizes = [l.shape[-1] for l in logits]
    sink_col = jnp.broadcast_to(sink.astype(jnp.float32)[:, None], (*logits[0].shape[:-1], 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits, sink_col], axis=-1), axis=-1)
    out = 0.0
    offset = 0
    for (kv, _), size in zip(parts, sizes):
        p = probs[..., offset:offset + size]
        spec = "bqhn,bqnd->bqhd" if kv.ndim == 4 else "bqhn,bnd->bqhd"
        out = out + jnp.einsum(spec, p, kv.astype(jnp.float32))
        offset += size
    return out


def grouped_out_proj(o, wo_a, dtype):
    """o: [batch, T, H, d] -> [batch, T, G * r_o]: head group g goes through wo_a[g]: [r_o, H*d/G]."""
    b, t = o.shape[:2]
    groups = wo_a.shape[0]
    u = jnp.einsum("btgi,gri->btgr", o.reshape(b, t, groups, -1), wo_a.astype(o.dtype),
                   preferred_element_type=jnp.float32)
    return u.astype(dtype).reshape(b, t, -1)


def kv_fake_quant(kv, rope_dim: int):
    """FP8-round the non-RoPE dims of KV vectors (blocks of 64); RoPE dims stay as they are."""
    nope = quant.fake_quant_fp8(kv[..., :-rope_dim], quant.KV_FP8_BLOCK)
    return jnp.concatenate([nope, kv[..., -rope_dim:]], axis=-1)


def window_view(ring, start, window: int):
    """Ring buffer [batch, W, d] -> entries in position order start-W .. start-1, with their positions."""
    pos = start[:, None] - window + jnp.arange(window)  # [batch, W]
    return jax.vmap(lambda r, p: r[p % window])(ring, pos), pos


def ring_slots(start, lengths, t_len: int, window: int):
    """Ring slots (position mod W) of a chunk's last (up to W) valid tokens; W (dropped) for the others."""
    t = jnp.arange(t_len)[None, :]
    keep = (t < lengths[:, None]) & (t >= lengths[:, None] - window)
    return jnp.where(keep, (start[:, None] + t) % window, window)


class GroupedWeight(nnx.Module):
    """wo_a: [G, r_o, H*d/G], kept dequantised (the reference converts it to bf16 at load time)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        group_in = cfg.num_attention_heads * cfg.head_dim // cfg.o_groups
        self.weight = param(normal(rngs, (cfg.o_groups, cfg.o_lora_rank, group_in), group_in**-0.5, cfg.dtype),
                            ("o_groups", "o_lora", None))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, ratio: int, rngs: nnx.Rngs):
        self.cfg, self.ratio = cfg, ratio
        dim, heads, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
        self.wq_a = Linear(dim, cfg.q_lora_rank, cfg, rngs, ("q_lora", "embed"), fp8=True)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, cfg.dtype, ("q_lora",))
        self.wq_b = Linear(cfg.q_lora_rank, heads * d, cfg, rngs, ("heads", "q_lora"), fp8=True)
        self.wkv = Linear(dim, d, cfg, rngs, ("kv", "embed"), fp8=True)
        self.kv_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.dtype, ("kv",))
        self.wo_a = GroupedWeight(cfg, rngs)
        self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, dim, cfg, rngs, ("embed", "o_groups"), fp8=True)
        self.attn_sink = param(jnp.zeros((heads,), jnp.float32), ("heads",))
        if ratio:
            self.compressor = Compressor(cfg, ratio, d, rngs)
        if ratio == 4:
            self.indexer = Indexer(cfg, rngs)

    def __call__(self, x, cache: dict, start, lengths, layer=None):
        """x: [batch, T, dim] (after attn_norm) -> ([batch, T, dim], updated cache).

        cache: this layer's arrays, or (layer given) a scanned stack's arrays and this layer's index.
        """
        cfg, ratio = self.cfg, self.ratio
        b, t_len, _ = x.shape
        heads, d, rope_dim, window = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.sliding_window
        inv_freq = layer_inv_freq(cfg, ratio)
        positions = start[:, None] + jnp.arange(t_len)  # [batch, T]

        q_lat = self.q_norm(self.wq_a(x))  # [batch, T, r_q], also the indexer's input
        q = self.wq_b(q_lat).reshape(b, t_len, heads, d)
        q = rms_normalize(q, cfg.rms_norm_eps).astype(x.dtype)
        q = constrain(apply_rope(q, positions[..., None], inv_freq), ("batch", "seq", "act_heads", None))
        kv = apply_rope(self.kv_norm(self.wkv(x)), positions, inv_freq)  # [batch, T, d]
        if cfg.quant_sim:
            kv = kv_fake_quant(kv, rope_dim)

        cache = LayerCache(cfg, cache, layer)
        ring_kv, ring_pos = window_view(cache.read("window"), start, window)
        win_kv = jnp.concatenate([ring_kv, kv], axis=1)  # [batch, W + T, d]
        win_pos = jnp.concatenate([ring_pos, positions], axis=1)
        cache.write_rows("window", kv, ring_slots(start, lengths, t_len, window))

        index_q = index_w = None
        if ratio:
            entries, idx, kv_state, score_state = self.compressor(
                x, start, lengths, cache.get("kv_state"), cache.get("score_state"), inv_freq)
            cache.set("kv_state", kv_state)
            cache.set("score_state", score_state)
            if cfg.quant_sim:
                entries = kv_fake_quant(entries, rope_dim)
            cache.write_rows("entries", entries, idx)
        if ratio == 4:
            keys, idx, kv_state, score_state = self.indexer.compressor(
                x, start, lengths, cache.get("index_kv_state"), cache.get("index_score_state"), inv_freq)
            cache.set("index_kv_state", kv_state)
            cache.set("index_score_state", score_state)
            cache.write_rows("index_keys", self.indexer.keys(keys), idx)
            index_q, index_w = self.indexer.queries(x, q_lat, positions, inv_freq)

        o = self._attend_blocks(q, positions, win_kv, win_pos, cache, index_q, index_w)
        o = apply_rope(o.astype(x.dtype), positions[..., None], inv_freq, inverse=True)
        wo_a = self.wo_a.weight[...]
        if hasattr(self.wo_a, "lora"):  # a LoRA adapter per group (v4jax.lora)
            wo_a = self.wo_a.lora.adapt(wo_a)
        return self.wo_b(grouped_out_proj(o, wo_a, x.dtype)), cache.arrays

    def _attend_blocks(self, q, positions, win_kv, win_pos, cache: LayerCache, index_q, index_w):
        """Attention in query blocks of up to W tokens, so memory stays linear in T.

        Block i holds queries i*Qb .. i*Qb+Qb-1; its window keys are the W + Qb ext
        entries starting at i*Qb (positions p-W+1 .. p for every query in it).
        """
        cfg, ratio, window = self.cfg, self.ratio, self.cfg.sliding_window
        b, t_len = positions.shape
        qb = min(window, t_len)
        n_blocks = -(-t_len // qb)
        pad = n_blocks * qb - t_len

        def pad_t(a):
            return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

        q, positions = pad_t(q), jnp.pad(positions, [(0, 0), (0, pad)], mode="edge")
        win_kv, win_pos = pad_t(win_kv), jnp.pad(win_pos, [(0, 0), (0, pad)], constant_values=-1)
        if index_q is not None:
            index_q, index_w = pad_t(index_q), pad_t(index_w)
        scale = cfg.head_dim**-0.5
        sink = self.attn_sink[...]
        if ratio == 4:
            index_keys = cache.read("index_keys")  # [batch, N, d_I]; main entries are gathered per query
            n_entries = index_keys.shape[1]
        elif ratio:
            entries = cache.read("entries")  # [batch, N, d]
            n_entries = entries.shape[1]

        def block(i):
            sl = lambda a, n: jax.lax.dynamic_slice_in_dim(a, i * qb, n, axis=1)
            p = sl(positions, qb)  # [batch, Qb]
            keys_pos = sl(win_pos, qb + window)
            rel = p[:, :, None] - keys_pos[:, None, :]
            parts = [(sl(win_kv, qb + window), (keys_pos[:, None, :] >= 0) & (rel >= 0) & (rel < window))]
            if ratio:
                visible = jnp.arange(n_entries) < ((p + 1) // ratio)[..., None]  # [batch, Qb, N]
                if ratio == 4:
                    scores = indexer_scores(sl(index_q, qb), index_keys, sl(index_w, qb))
                    idx, valid = select_topk(scores, visible, cfg.index_topk)
                    parts.append((cache.read("entries", idx), valid))  # [batch, Qb, k, d]
                else:
                    parts.append((entries, visible))
            return sink_attention(sl(q, qb), parts, sink, scale)

        out = jax.lax.map(block, jnp.arange(n_blocks))  # [n_blocks, batch, Qb, H, d]
        out = jnp.moveaxis(out, 0, 1).reshape(b, n_blocks * qb, *out.shape[3:])
        return out[:, :t_len]
