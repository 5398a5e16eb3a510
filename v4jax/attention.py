"""Hybrid attention of one block (spec §2.3–2.7).

Every layer attends over a 128-token sliding window of raw KV. CSA layers (ratio 4)
add the compressed entries their lightning indexer picks (gathered, not masked);
HCA layers add every compressed entry; window-only layers add nothing. One softmax
with a learned per-head sink covers all of it. K = V: one shared 512-wide head.

One code path serves a whole sequence, chunked prefill and decode: a chunk of T
tokens at positions start + t (per sequence, valid for t < lengths) reads and
updates the layer's cache (window ring buffer, compressed entries, compressor
carries, indexer keys); a whole-sequence forward is a chunk over a fresh cache.

A whole-sequence forward may hold several documents per row (`Documents`, from segment
ids): RoPE restarts per document, and the window, the compressed entries and the
indexer's candidates are masked to the query's own document. With every document
starting at a multiple of every compression ratio, the row-aligned groups are the
per-document groups, so each document is compressed on its own (training spec §8).

With `indexer_kl` a CSA layer also returns what the indexer losses of
v4jax.indexer_loss need (training spec §3): the indexer scores over each query's
candidates and the main attention's probabilities on them, summed over heads.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax import quant
from v4jax.cache import LayerCache
from v4jax.compressor import Compressor
from v4jax.config import ModelConfig
from v4jax.errors import DataError
from v4jax.indexer import Indexer, indexer_scores, prefix_widths, select_topk, select_visible_topk
from v4jax.linear import Linear
from v4jax.norms import RMSNorm, rms_normalize
from v4jax.params import normal, param
from v4jax.rope import apply_rope, layer_inv_freq
from v4jax.sharding import active_rules, constrain


# A CSA query block scores (and ranks) only the prefix of compressed entries it may see, its width
# rounded up to one of this many even steps (one compiled branch each; 8: within 1/8 of the entries).
INDEX_WIDTH_STEPS = 8


def sink_probs(q, parts, sink, scale: float):
    """Softmax weights of attention whose denominator also counts e^sink (spec §2.3).

    q: [batch, Tq, H, d]; parts: list of (kv, mask) where kv is shared by the queries
    ([batch, N, d], mask [batch, Tq, N]) or per query ([batch, Tq, N, d], mask
    [batch, Tq, N]); sink: [H] raw logits. Returns per part its weights
    [batch, Tq, H, N] float32 (the sink's share is dropped).
    """
    logits = []
    for kv, mask in parts:
        spec = "bqhd,bqnd->bqhn" if kv.ndim == 4 else "bqhd,bnd->bqhn"
        s = jnp.einsum(spec, q, kv, preferred_element_type=jnp.float32) * scale
        logits.append(jnp.where(mask[:, :, None, :], s, -jnp.inf))
    sink_col = jnp.broadcast_to(sink.astype(jnp.float32)[:, None], (*logits[0].shape[:-1], 1))
    probs = jax.nn.softmax(jnp.concatenate([*logits, sink_col], axis=-1), axis=-1)
    bounds = np.cumsum([l.shape[-1] for l in logits])
    return jnp.split(probs[..., :bounds[-1]], bounds[:-1], axis=-1)


def sink_attention(q, parts, sink, scale: float):
    """Attention with sink over `parts` (see sink_probs) -> [batch, Tq, H, d] float32."""
    out = 0.0
    for (kv, _), p in zip(parts, sink_probs(q, parts, sink, scale)):
        spec = "bqhn,bqnd->bqhd" if kv.ndim == 4 else "bqhn,bnd->bqhd"
        out = out + jnp.einsum(spec, p, kv.astype(jnp.float32))
    return out


def head_summed_target(probs, candidates):
    """Indexer-loss target (training spec §3): attention weights [batch, Tq, H, N] summed over heads,
    L1-normalised over each query's candidates [batch, Tq, N] (all zero where it has none)."""
    summed = jnp.sum(jnp.where(candidates[:, :, None, :], probs, 0.0), axis=2)
    return summed / jnp.maximum(jnp.sum(summed, axis=-1, keepdims=True), jnp.finfo(jnp.float32).tiny)


class Documents(NamedTuple):
    """Documents packed in whole-sequence rows: maximal runs of one segment id (runs of
    padding, id 0, are documents nothing else sees)."""
    run: jax.Array  # [batch, T] int32: which run of its row each token belongs to
    positions: jax.Array  # [batch, T] int32: position inside its run (RoPE's position)


def document_layout(segment_ids) -> Documents:
    """segment_ids: [batch, T] int (0 = padding, 1.. one per document of a row) -> Documents."""
    t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    opens = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    first = jax.lax.cummax(jnp.where(opens, t, 0), axis=1)
    return Documents(jnp.cumsum(opens, axis=1, dtype=jnp.int32) - 1, t - first)


def packing_multiple(cfg: ModelConfig) -> int:
    """Documents must start at multiples of this (every compression ratio divides it)."""
    return math.lcm(1, *(r for r in cfg.compress_ratios if r))


def check_document_starts(segment_ids, multiple: int) -> None:
    """Host-side: every document (non-zero run) of segment_ids [batch, T] starts at a multiple of `multiple`."""
    seg = np.asarray(segment_ids)
    opens = np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    rows, cols = np.nonzero(opens & (seg != 0) & (np.arange(seg.shape[1]) % multiple != 0))
    if rows.size:
        raise DataError(f"segment_ids row {rows[0]}: document {seg[rows[0], cols[0]]} starts at position {cols[0]}, "
                        f"not a multiple of {multiple} (pad documents so compression groups stay inside them)")


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

    def __call__(self, x, cache: dict, start, lengths, layer=None, docs: Documents | None = None,
                 indexer_kl: str | None = None):
        """x: [batch, T, dim] (after attn_norm) -> ([batch, T, dim], updated cache, side outputs).

        cache: this layer's arrays, or (layer given) a scanned stack's arrays and this layer's index.
        docs (whole sequences only, start 0): the documents packed in each row. indexer_kl "dense" or
        "sparse": a CSA layer's side outputs hold the indexer-loss inputs (see _attend_blocks);
        otherwise they are {}.
        """
        cfg, ratio = self.cfg, self.ratio
        b, t_len, _ = x.shape
        heads, d, rope_dim, window = cfg.num_attention_heads, cfg.head_dim, cfg.qk_rope_head_dim, cfg.sliding_window
        inv_freq = layer_inv_freq(cfg, ratio)
        positions = start[:, None] + jnp.arange(t_len)  # [batch, T] row positions: causality, window, cache slots
        rope_pos = positions if docs is None else docs.positions

        q_lat = self.q_norm(self.wq_a(x))  # [batch, T, r_q], also the indexer's input
        q = self.wq_b(q_lat).reshape(b, t_len, heads, d)
        q = rms_normalize(q, cfg.rms_norm_eps).astype(x.dtype)
        q = constrain(apply_rope(q, rope_pos[..., None], inv_freq), ("batch", "seq", "act_heads", None))
        kv = apply_rope(self.kv_norm(self.wkv(x)), rope_pos, inv_freq)  # [batch, T, d]
        if cfg.quant_sim:
            kv = kv_fake_quant(kv, rope_dim)

        cache = LayerCache(cfg, cache, layer)
        ring_kv, ring_pos = window_view(cache.read("window"), start, window)
        win_kv = jnp.concatenate([ring_kv, kv], axis=1)  # [batch, W + T, d]
        win_pos = jnp.concatenate([ring_pos, positions], axis=1)
        cache.write_rows("window", kv, ring_slots(start, lengths, t_len, window))

        doc_pos = None if docs is None else docs.positions
        index_q = index_w = None
        if ratio:
            entries, idx, kv_state, score_state = self.compressor(
                x, start, lengths, cache.get("kv_state"), cache.get("score_state"), inv_freq, doc_pos)
            cache.set("kv_state", kv_state)
            cache.set("score_state", score_state)
            if cfg.quant_sim:
                entries = kv_fake_quant(entries, rope_dim)
            cache.write_rows("entries", entries, idx)
        if ratio == 4:
            # Top-k is discrete, so the indexer's inputs carry gradient only from the indexer loss,
            # which the training spec (§3) detaches from the main model.
            x_i, q_lat_i = jax.lax.stop_gradient(x), jax.lax.stop_gradient(q_lat)
            keys, idx, kv_state, score_state = self.indexer.compressor(
                x_i, start, lengths, cache.get("index_kv_state"), cache.get("index_score_state"), inv_freq, doc_pos)
            cache.set("index_kv_state", kv_state)
            cache.set("index_score_state", score_state)
            cache.write_rows("index_keys", self.indexer.keys(keys), idx)
            index_q, index_w = self.indexer.queries(x_i, q_lat_i, rope_pos, inv_freq)

        o, side = self._attend_blocks(q, positions, win_kv, win_pos, cache, index_q, index_w, docs,
                                      indexer_kl if ratio == 4 else None)
        o = apply_rope(o.astype(x.dtype), rope_pos[..., None], inv_freq, inverse=True)
        wo_a = self.wo_a.weight[...]
        if hasattr(self.wo_a, "lora"):  # a LoRA adapter per group (v4jax.lora)
            wo_a = self.wo_a.lora.adapt(wo_a)
        return self.wo_b(grouped_out_proj(o, wo_a, x.dtype)), cache.arrays, side

    def _attend_blocks(self, q, positions, win_kv, win_pos, cache: LayerCache, index_q, index_w,
                       docs: Documents | None, indexer_kl: str | None):
        """Attention in query blocks of up to W tokens, so memory stays linear in T.

        Block i holds queries i*Qb .. i*Qb+Qb-1; its window keys are the W + Qb ext
        entries starting at i*Qb (positions p-W+1 .. p for every query in it).

        Returns the output and the side outputs: {} or, with indexer_kl, [batch, T, C] arrays
        over each query's C candidates, "scores" (the indexer's I), "target" (the main attention's
        weights summed over heads, L1-normalised over the candidates: training spec §3) and
        "candidates" (bool). "dense": C = every compressed entry (candidates: the causal ones),
        target from the dense attention over window, all causal entries and sink; "sparse": C = the
        top-k slots ("index" [batch, T, k] holds their entries), target from the attention the
        layer runs.
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
            # With the entries split over devices (sequence-parallel top-k) every query block scores them all.
            layout = active_rules()
            steps = 1 if layout is not None and layout.live_axes("cache_seq") else INDEX_WIDTH_STEPS
            widths = prefix_widths(n_entries, cfg.index_topk, steps)
        if ratio and (ratio != 4 or indexer_kl == "dense"):
            entries = cache.read("entries")  # [batch, N, d]
            n_entries = entries.shape[1]
        if docs is not None:
            run = jnp.pad(docs.run, [(0, 0), (0, pad)], mode="edge")  # [batch, T + pad]
            win_run = jnp.pad(docs.run, [(0, 0), (window, pad)], constant_values=-1)  # [batch, W + T + pad]
            if ratio:  # an entry belongs to the run of its group's last token: tails mixed with padding stay unseen
                last = jnp.minimum(jnp.arange(n_entries) * ratio + ratio - 1, t_len - 1)
                entry_run = docs.run[:, last]  # [batch, N]

        def block(i):
            sl = lambda a, n: jax.lax.dynamic_slice_in_dim(a, i * qb, n, axis=1)
            p = sl(positions, qb)  # [batch, Qb]
            keys_pos = sl(win_pos, qb + window)
            rel = p[:, :, None] - keys_pos[:, None, :]
            win_mask = (keys_pos[:, None, :] >= 0) & (rel >= 0) & (rel < window)
            if docs is not None:
                q_run = sl(run, qb)[:, :, None]  # [batch, Qb, 1]
                win_mask &= sl(win_run, qb + window)[:, None, :] == q_run
            parts = [(sl(win_kv, qb + window), win_mask)]
            side = {}
            if ratio:
                visible = jnp.arange(n_entries) < ((p + 1) // ratio)[..., None]  # [batch, Qb, N]
                if docs is not None:
                    visible &= entry_run[:, None, :] == q_run
                if ratio == 4 and indexer_kl == "dense":
                    scores = indexer_scores(sl(index_q, qb), index_keys, sl(index_w, qb))
                    idx, valid = select_topk(scores, visible, cfg.index_topk)
                    parts.append((cache.read("entries", idx), valid))  # [batch, Qb, k, d]
                    dense = sink_probs(sl(q, qb), [parts[0], (entries, visible)], sink, scale)[1]
                    side = {"scores": scores, "candidates": visible, "target": head_summed_target(dense, visible)}
                elif ratio == 4:
                    n_visible = jnp.minimum(jnp.max(p) + 1, n_entries * ratio) // ratio
                    idx, valid, picked = select_visible_topk(sl(index_q, qb), index_keys, sl(index_w, qb), visible,
                                                             cfg.index_topk, n_visible, widths)
                    parts.append((cache.read("entries", idx), valid))  # [batch, Qb, k, d]
                    if indexer_kl == "sparse":
                        side = {"scores": picked, "candidates": valid,
                                "target": head_summed_target(sink_probs(sl(q, qb), parts, sink, scale)[1], valid),
                                "index": idx}
                else:
                    parts.append((entries, visible))
            return sink_attention(sl(q, qb), parts, sink, scale), side

        if cfg.remat:
            # The backward pass of the (rematerialised) layer would otherwise keep every block's
            # gathered top-k entries and scores at once ([batch, T, k, d] float32: 8.6 GB per
            # sequence for Flash at 8K); recomputed per block, it holds one block's.
            block = jax.checkpoint(block)
        out, side = jax.lax.map(block, jnp.arange(n_blocks))  # [n_blocks, batch, Qb, ...]
        unblock = lambda a: jnp.moveaxis(a, 0, 1).reshape(b, n_blocks * qb, *a.shape[3:])[:, :t_len]
        return unblock(out), jax.tree.map(unblock, side)
