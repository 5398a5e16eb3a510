"""Block, scanned layer stacks, the MTP block and the whole Transformer (spec §2.1, §2.7b, §2.11, §2.12).

Layers of the same structure are stacked and run with `jax.lax.scan`, so compile
time is nearly flat in depth; `ModelConfig.layer_plan` says which layers share a stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.attention import Attention
from v4jax.cache import init_cache
from v4jax.config import LayerKind, ModelConfig
from v4jax.hyper_connections import hc_head, hc_post, hc_pre
from v4jax.linear import Linear
from v4jax.moe import MoE
from v4jax.norms import RMSNorm
from v4jax.params import normal, param
from v4jax.sharding import constrain


class Block(nnx.Module):
    """One transformer block: mHC around attention, mHC around the MoE."""

    def __init__(self, cfg: ModelConfig, kind: LayerKind, rngs: nnx.Rngs):
        self.cfg = cfg
        n, dim = cfg.hc_mult, cfg.hidden_size
        rows = (2 + n) * n
        for side in ("attn", "ffn"):
            setattr(self, f"hc_{side}_fn", param(normal(rngs, (rows, n * dim), 0.02, jnp.float32), (None, None)))
            setattr(self, f"hc_{side}_base", param(jnp.zeros((rows,), jnp.float32), (None,)))
            setattr(self, f"hc_{side}_scale", param(jnp.ones((3,), jnp.float32), (None,)))
        self.attn_norm = RMSNorm(dim, cfg.rms_norm_eps, cfg.dtype, ("embed",))
        self.attn = Attention(cfg, kind.ratio, rngs)
        self.ffn_norm = RMSNorm(dim, cfg.rms_norm_eps, cfg.dtype, ("embed",))
        self.ffn = MoE(cfg, kind, rngs)

    def _hc(self, side: str, x):
        cfg = self.cfg
        return hc_pre(x, getattr(self, f"hc_{side}_fn")[...], getattr(self, f"hc_{side}_base")[...],
                      getattr(self, f"hc_{side}_scale")[...], iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
                      norm_eps=cfg.rms_norm_eps)

    def __call__(self, x, token_ids, cache: dict, start, lengths, layer=None, valid=None):
        """x: [batch, T, n_hc, dim] -> (same, updated cache); `layer` indexes a stacked cache (see Attention).

        With `valid` ([batch, T], 1 for real tokens) also the MoE's routing statistics (see MoE).
        """
        y, post, comb = self._hc("attn", x)
        a, cache = self.attn(self.attn_norm(y), cache, start, lengths, layer)
        x = hc_post(a, x, post, comb)
        y, post, comb = self._hc("ffn", x)
        if valid is None:
            f, stats = self.ffn(self.ffn_norm(y), token_ids), None
        else:
            f, stats = self.ffn(self.ffn_norm(y), token_ids, valid)
        x = constrain(hc_post(f, x, post, comb), ("batch", "seq", None, "act_embed"))
        return (x, cache) if valid is None else (x, cache, stats)


def stacked_blocks(cfg: ModelConfig, kind: LayerKind, reps: int, rngs: nnx.Rngs) -> Block:
    """`reps` blocks of one kind with every parameter stacked along a leading axis."""

    @nnx.split_rngs(splits=reps)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return Block(cfg, kind, r)

    return make(rngs)


def init_hc_head(owner: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """Give `owner` the hc_head_fn / _base / _scale of a final stream collapse (main model and MTP block)."""
    n, dim = cfg.hc_mult, cfg.hidden_size
    owner.hc_head_fn = param(normal(rngs, (n, n * dim), 0.02, jnp.float32), (None, None))
    owner.hc_head_base = param(jnp.zeros((n,), jnp.float32), (None,))
    owner.hc_head_scale = param(jnp.ones((1,), jnp.float32), (None,))


def collapse_and_project(owner, norm: RMSNorm, head_weight, x, cfg: ModelConfig):
    """Streams [batch, T, n, dim] -> float32 logits [batch, T, vocab] (head applied in float32)."""
    h = hc_head(x, owner.hc_head_fn[...], owner.hc_head_base[...], owner.hc_head_scale[...],
                hc_eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps)
    h = norm(h).astype(jnp.float32)
    return constrain(jnp.einsum("btd,vd->btv", h, head_weight.astype(jnp.float32)), ("batch", "seq", "act_vocab"))


class MTPBlock(Block):
    """Multi-token prediction (spec §2.12): a window-only block fed by the main streams and the next token."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        super().__init__(cfg, cfg.layer_kind(cfg.num_hidden_layers), rngs)
        dim = cfg.hidden_size
        self.e_proj = Linear(dim, dim, cfg, rngs, ("embed", None), fp8=True)
        self.h_proj = Linear(dim, dim, cfg, rngs, ("embed", None), fp8=True)
        self.enorm = RMSNorm(dim, cfg.rms_norm_eps, cfg.dtype, ("embed",))
        self.hnorm = RMSNorm(dim, cfg.rms_norm_eps, cfg.dtype, ("embed",))
        self.norm = RMSNorm(dim, cfg.rms_norm_eps, cfg.dtype, ("embed",))
        init_hc_head(self, cfg, rngs)

    def predict(self, streams, next_embed, next_ids, head_weight, cache, start, lengths, valid=None):
        """streams: main model's final [batch, T, n, dim] (before hc_head); next_embed: embed(token t+1).

        Returns (logits, cache), and the routing statistics as a third item when `valid` is given.
        """
        x = self.e_proj(self.enorm(next_embed))[:, :, None, :] + self.h_proj(self.hnorm(streams))
        x, cache, *stats = self(x, next_ids, cache, start, lengths, valid=valid)
        return collapse_and_project(self, self.norm, head_weight, x, self.cfg), cache, *stats


class Table(nnx.Module):
    """A [vocab, dim] matrix: the input embedding or the LM head."""

    def __init__(self, cfg: ModelConfig, std: float, rngs: nnx.Rngs):
        self.weight = param(normal(rngs, (cfg.vocab_size, cfg.hidden_size), std, cfg.dtype), ("vocab", "embed"))


class Transformer(nnx.Module):
    """DeepSeek-V4: `model(ids)` gives logits; `model.forward` adds MTP logits and the decode state."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dim = cfg.hidden_size
        self.embed = Table(cfg, 1.0, rngs)
        self.layers = nnx.List([
            nnx.List([stacked_blocks(cfg, kind, seg.reps, rngs) for kind in seg.unit]) for seg in cfg.layer_plan])
        self.norm = RMSNorm(dim, cfg.rms_norm_eps, cfg.dtype, ("embed",))
        self.head = Table(cfg, dim**-0.5, rngs)
        init_hc_head(self, cfg, rngs)
        if cfg.num_nextn_predict_layers:
            self.mtp = nnx.List([MTPBlock(cfg, rngs)])

    def __call__(self, input_ids):
        """input_ids: [batch, seq] -> float32 logits [batch, seq, vocab]."""
        return self.forward(input_ids)[0]

    def fresh_state(self, batch: int, seq: int) -> dict:
        """A decode state sized exactly for one whole-sequence forward (see v4jax.cache.init_cache)."""
        return init_cache(self.cfg, batch, seq)

    def streams(self, input_ids, state: dict, lengths, in_place: bool = True, valid=None):
        """The blocks over a chunk (see forward) -> (final streams [batch, T, n_hc, dim] before hc_head,
        the state with the chunk added, and with `valid` the blocks' routing statistics per segment).
        Speculative decoding runs the MTP block on the streams itself."""
        cfg = self.cfg
        b, t_len = input_ids.shape
        h = constrain(self.embed.weight[...][input_ids], ("batch", "seq", "act_embed"))
        x = jnp.broadcast_to(h[:, :, None, :], (b, t_len, cfg.hc_mult, cfg.hidden_size))
        new_layers, stats = [], []
        for stack, seg_cache in zip(self.layers, state["layers"]):
            x, seg_cache, *seg_stats = run_segment(stack, x, input_ids, seg_cache, state["pos"], lengths, cfg.remat,
                                                   in_place, valid)
            new_layers.append(seg_cache)
            stats.extend(seg_stats)
        new_state = {**state, "pos": state["pos"] + lengths, "layers": new_layers}
        return (x, new_state) if valid is None else (x, new_state, stats)

    def forward(self, input_ids, state: dict | None = None, lengths=None, *, mtp: bool = False,
                routing: bool = False):
        """Run a chunk of tokens.

        input_ids: [batch, T]; state: decode state (None: a fresh one, i.e. a whole
        sequence from position 0); lengths: [batch] valid tokens of the chunk per
        sequence (default T). Returns (logits [batch, T, vocab] float32, MTP logits or
        None, new state). With mtp=True the MTP block predicts token t+2 from the
        streams at t and embed(token t+1); the last position has no next token and
        uses token id 0 there (its MTP logits are not meaningful).

        routing=True (training; whole sequences only) adds a fourth item, the routing
        statistics of every MoE layer: {"layers": per segment, per block of its unit,
        {"counts": [reps, E], "balance": [reps]}; "mtp": the MTP block's, or None}.
        """
        b, t_len = input_ids.shape
        # A given state is updated in place; a fresh one (training, scoring) is scanned layer by layer.
        in_place = state is not None
        state = self.fresh_state(b, t_len) if state is None else state
        lengths = jnp.full((b,), t_len, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        start = state["pos"]
        embed = self.embed.weight[...]
        if routing and in_place:
            raise ValueError("routing statistics are for whole-sequence forwards (state=None)")
        valid = (jnp.arange(t_len)[None, :] < lengths[:, None]).astype(jnp.float32) if routing else None
        x, new_state, *stats = self.streams(input_ids, state, lengths, in_place, valid)
        stats = stats[0] if stats else None
        logits = collapse_and_project(self, self.norm, self.head.weight[...], x, self.cfg)

        mtp_logits, mtp_stats = None, None
        if mtp:
            next_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
            # The last position's "next token" is a stand-in: it routes, but is no real token.
            mtp_valid = None if valid is None else valid * (jnp.arange(t_len)[None, :] < lengths[:, None] - 1)
            mtp_logits, new_state["mtp"], *mtp_stats = self.mtp[0].predict(
                x, embed[next_ids], next_ids, self.head.weight[...], state["mtp"], start, lengths, mtp_valid)
            mtp_stats = mtp_stats[0] if mtp_stats else None
        if routing:
            return logits, mtp_logits, new_state, {"layers": stats, "mtp": mtp_stats}
        return logits, mtp_logits, new_state


def run_segment(stack, x, token_ids, caches: list[dict], start, lengths, remat: bool, in_place: bool = False,
                valid=None):
    """Scan one segment: each step runs the unit's blocks (one slice of every stacked parameter).

    in_place=False passes each layer its cache slice (scan xs -> ys), which rewrites
    every cache array. in_place=True carries the stacked caches and each layer writes
    its new rows into them, so a decode step costs O(new rows), not O(cache size).
    With `valid` (in_place=False only) the blocks' routing statistics come out as a third
    item, stacked over the segment's repetitions.
    """
    graphdefs, params = zip(*(nnx.split(block) for block in stack))

    def run_unit(x, unit_params, unit_caches, layer):
        new_caches, stats = [], []
        for graphdef, p, c in zip(graphdefs, unit_params, unit_caches):
            x, c, *s = nnx.merge(graphdef, p)(x, token_ids, c, start, lengths, layer, valid)
            new_caches.append(c)
            stats.extend(s)
        return x, (new_caches, stats) if valid is not None else new_caches

    if in_place:
        def body(carry, unit_params):
            x, unit_caches, layer = carry
            return (*run_unit(x, unit_params, unit_caches, layer), layer + 1), None
    else:
        def body(x, slices):
            return run_unit(x, *slices, None)

    if remat:
        body = jax.checkpoint(body)
    if in_place:
        (x, new_caches, _), _ = jax.lax.scan(body, (x, list(caches), jnp.int32(0)), list(params))
        return x, new_caches
    x, ys = jax.lax.scan(body, x, (list(params), caches))
    return (x, *ys) if valid is not None else (x, ys)
