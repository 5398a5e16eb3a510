"""Block, scanned layer stacks, the MTP block and the whole Transformer (spec §2.1, §2.7b, §2.11, §2.12).

Layers of the same structure are stacked and run with `jax.lax.scan`, so compile
time is nearly flat in depth; `ModelConfig.layer_plan` says which layers share a stack.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.attention import Attention, Documents, check_document_starts, document_layout, packing_multiple
from v4jax.cache import init_cache
from v4jax.config import LayerKind, ModelConfig
from v4jax.hyper_connections import hc_head, hc_post, hc_pre
from v4jax.linear import Linear
from v4jax.moe import MoE
from v4jax.norms import RMSNorm
from v4jax.params import is_traced, normal, param
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

    def __call__(self, x, token_ids, cache: dict, start, lengths, layer=None, valid=None,
                 docs: Documents | None = None, indexer_kl: str | None = None):
        """x: [batch, T, n_hc, dim] -> (same, updated cache, side outputs); `layer` indexes a stacked
        cache, `docs` and `indexer_kl` are as for Attention.

        Side outputs: {"routing": the MoE's routing statistics (see MoE)} with `valid` ([batch, T]
        int: 0 for tokens that do not count, else the token's document in its row), {"indexer": the attention's indexer-loss inputs} with indexer_kl on a CSA layer.
        """
        y, post, comb = self._hc("attn", x)
        a, cache, attn_side = self.attn(self.attn_norm(y), cache, start, lengths, layer, docs, indexer_kl)
        side = {"indexer": attn_side} if attn_side else {}
        x = hc_post(a, x, post, comb)
        y, post, comb = self._hc("ffn", x)
        if valid is None:
            f = self.ffn(self.ffn_norm(y), token_ids)
        else:
            f, side["routing"] = self.ffn(self.ffn_norm(y), token_ids, valid)
        return constrain(hc_post(f, x, post, comb), ("batch", "seq", None, "act_embed")), cache, side


def stacked_blocks(cfg: ModelConfig, kind: LayerKind, reps: int, rngs: nnx.Rngs) -> Block:
    """`reps` blocks of one kind with every parameter stacked along a leading axis.

    Traced (jit, eval_shape), one vmapped Block. Eager, the same blocks one by one from the
    same split keys, stacked on the host: an eager vmap would compile every batched op per
    shape, while a Block built eagerly reuses the few programs of `params.normal`.
    """
    with nnx.split_rngs(rngs, splits=reps):
        if is_traced(rngs):
            return nnx.vmap(lambda r: Block(cfg, kind, r), in_axes=(0,), out_axes=0)(rngs)
        rngs_def, rngs_state = nnx.split(rngs)
        blocks = [nnx.split(Block(cfg, kind, nnx.merge(rngs_def, jax.tree.map(lambda a: a[i], rngs_state))))
                  for i in range(reps)]
    stacked = jax.tree.map(lambda *a: jax.device_put(np.stack([np.asarray(x) for x in a])), *(s for _, s in blocks))
    return nnx.merge(blocks[0][0], stacked)


def init_hc_head(owner: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
    """Give `owner` the hc_head_fn / _base / _scale of a final stream collapse (main model and MTP block)."""
    n, dim = cfg.hc_mult, cfg.hidden_size
    owner.hc_head_fn = param(normal(rngs, (n, n * dim), 0.02, jnp.float32), (None, None))
    owner.hc_head_base = param(jnp.zeros((n,), jnp.float32), (None,))
    owner.hc_head_scale = param(jnp.ones((1,), jnp.float32), (None,))


def collapse(owner, norm: RMSNorm, x, cfg: ModelConfig):
    """Streams [batch, T, n, dim] -> the head's input [batch, T, dim] float32."""
    h = hc_head(x, owner.hc_head_fn[...], owner.hc_head_base[...], owner.hc_head_scale[...],
                hc_eps=cfg.hc_eps, norm_eps=cfg.rms_norm_eps)
    return norm(h).astype(jnp.float32)


def project(h, head_weight):
    """The head's input [batch, T, dim] float32 -> float32 logits [batch, T, vocab] (head applied in float32)."""
    return constrain(jnp.einsum("btd,vd->btv", h, head_weight.astype(jnp.float32)), ("batch", "seq", "act_vocab"))


def collapse_and_project(owner, norm: RMSNorm, head_weight, x, cfg: ModelConfig):
    """Streams [batch, T, n, dim] -> float32 logits [batch, T, vocab]."""
    return project(collapse(owner, norm, x, cfg), head_weight)


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

    def predict(self, streams, next_embed, next_ids, head_weight, cache, start, lengths, valid=None,
                docs: Documents | None = None):
        """streams: main model's final [batch, T, n, dim] (before hc_head); next_embed: embed(token t+1).

        Returns (logits, cache), and the routing statistics as a third item when `valid` is given.
        head_weight None: the head's input [batch, T, dim] instead of the logits (v4jax.train.head_logprobs).
        """
        x = self.e_proj(self.enorm(next_embed))[:, :, None, :] + self.h_proj(self.hnorm(streams))
        x, cache, side = self(x, next_ids, cache, start, lengths, valid=valid, docs=docs)
        logits = collapse(self, self.norm, x, self.cfg)
        if head_weight is not None:
            logits = project(logits, head_weight)
        return (logits, cache) if valid is None else (logits, cache, side["routing"])


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

    def streams(self, input_ids, state: dict, lengths, in_place: bool = True, valid=None,
                docs: Documents | None = None, indexer_kl: str | None = None):
        """The blocks over a chunk (see forward) -> (final streams [batch, T, n_hc, dim] before hc_head,
        the state with the chunk added). With `valid` or `indexer_kl` (in_place=False only) a third item:
        per segment, per block of its unit, the block's side outputs stacked over the repetitions.
        Speculative decoding runs the MTP block on the streams itself."""
        cfg = self.cfg
        b, t_len = input_ids.shape
        h = constrain(self.embed.weight[...][input_ids], ("batch", "seq", "act_embed"))
        x = jnp.broadcast_to(h[:, :, None, :], (b, t_len, cfg.hc_mult, cfg.hidden_size))
        new_layers, sides = [], []
        for stack, seg_cache in zip(self.layers, state["layers"]):
            x, seg_cache, seg_sides = run_segment(stack, x, input_ids, seg_cache, state["pos"], lengths, cfg.remat,
                                                  in_place, valid, docs, indexer_kl)
            new_layers.append(seg_cache)
            sides.append(seg_sides)
        new_state = {**state, "pos": state["pos"] + lengths, "layers": new_layers}
        return (x, new_state) if valid is None and indexer_kl is None else (x, new_state, sides)

    def forward(self, input_ids, state: dict | None = None, lengths=None, *, mtp: bool = False,
                routing: bool = False, segment_ids=None, indexer_kl: str | None = None, hidden: bool = False):
        """Run a chunk of tokens.

        input_ids: [batch, T]; state: decode state (None: a fresh one, i.e. a whole
        sequence from position 0); lengths: [batch] valid tokens of the chunk per
        sequence (default T). Returns (logits [batch, T, vocab] float32, MTP logits or
        None, new state). With mtp=True the MTP block predicts token t+2 from the
        streams at t and embed(token t+1); the last position has no next token and
        uses token id 0 there (its MTP logits are not meaningful). hidden=True: the head's
        input [batch, T, dim] float32 (and the MTP block's) in place of the logits, for
        v4jax.train.head_logprobs.

        segment_ids ([batch, T] int, whole sequences only): documents packed in a row, 0 for
        padding, one id per document (a document is a maximal run of one id). Every token sees
        only its own document, positions (RoPE) restart at 0 in each, and each is compressed
        on its own, so a document's logits and MTP logits are those of the document run alone
        (its last position's MTP "next token" is the stand-in 0, as at a row's end). Documents
        must start at multiples of `packing_multiple(cfg)` (128 for V4): a DataError when the
        ids are concrete; under jit the caller's data pipeline must guarantee it
        (attention.check_document_starts). Padding changes no other token's output.

        routing=True (training; whole sequences only) adds a fourth item, the training side
        outputs, with the routing statistics of every MoE layer (real tokens only: within
        lengths, segment id not 0): {"layers": per segment, per block of its unit, {"counts":
        [reps, E], "balance": [reps], the balance loss averaged over the packed documents (rows
        without segment_ids)}; "mtp": the MTP block's, or None}. indexer_kl "dense" or
        "sparse" (whole sequences only) adds the fourth item too, with "indexer": per CSA layer
        (segment by segment, each unit's blocks in order) the attention's indexer-loss inputs
        [reps, batch, T, C] (see Attention._attend_blocks; v4jax.indexer_loss turns them into the losses).
        """
        b, t_len = input_ids.shape
        # A given state is updated in place; a fresh one (training, scoring) is scanned layer by layer.
        in_place = state is not None
        if in_place and (routing or segment_ids is not None or indexer_kl is not None):
            raise ValueError("routing, segment_ids and indexer_kl are for whole-sequence forwards (state=None)")
        if indexer_kl not in (None, "dense", "sparse"):
            raise ValueError(f"indexer_kl must be None, 'dense' or 'sparse', got {indexer_kl!r}")
        state = self.fresh_state(b, t_len) if state is None else state
        lengths = jnp.full((b,), t_len, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
        start = state["pos"]
        embed = self.embed.weight[...]
        real = jnp.arange(t_len)[None, :] < lengths[:, None]  # [batch, T]
        has_next = jnp.arange(t_len)[None, :] < lengths[:, None] - 1
        docs = None
        if segment_ids is not None:
            if not isinstance(segment_ids, jax.core.Tracer):
                check_document_starts(segment_ids, packing_multiple(self.cfg))
            segment_ids = jnp.asarray(segment_ids)
            docs = document_layout(segment_ids)
            real &= segment_ids != 0
            has_next &= jnp.pad(docs.run[:, 1:] == docs.run[:, :-1], [(0, 0), (0, 1)])
        # Which tokens the routing statistics count, and the sequence of the balance loss each is
        # in: its packed document (training spec §10.2), else its row.
        valid = None
        if routing:
            valid = real.astype(jnp.int32) if docs is None else jnp.where(real, docs.run + 1, 0)
        x, new_state, *sides = self.streams(input_ids, state, lengths, in_place, valid, docs, indexer_kl)
        sides = sides[0] if sides else []
        head = None if hidden else self.head.weight[...]
        logits = collapse(self, self.norm, x, self.cfg)
        if not hidden:
            logits = project(logits, head)

        mtp_logits, mtp_stats = None, None
        if mtp:
            next_ids = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
            if docs is not None:  # the shift stays inside the document: its last token gets the stand-in too
                next_ids = jnp.where(has_next, next_ids, 0)
            # The last position's "next token" is a stand-in: it routes, but is no real token.
            mtp_valid = None if valid is None else jnp.where(has_next, valid, 0)
            mtp_logits, new_state["mtp"], *mtp_stats = self.mtp[0].predict(
                x, embed[next_ids], next_ids, head, state["mtp"], start, lengths, mtp_valid, docs)
            mtp_stats = mtp_stats[0] if mtp_stats else None
        if not (routing or indexer_kl):
            return logits, mtp_logits, new_state
        aux = {}
        if routing:
            aux.update(layers=[[side["routing"] for side in seg] for seg in sides], mtp=mtp_stats)
        if indexer_kl:
            aux["indexer"] = [side["indexer"] for seg in sides for side in seg if "indexer" in side]
        return logits, mtp_logits, new_state, aux


def run_segment(stack, x, token_ids, caches: list[dict], start, lengths, remat: bool, in_place: bool = False,
                valid=None, docs: Documents | None = None, indexer_kl: str | None = None):
    """Scan one segment: each step runs the unit's blocks (one slice of every stacked parameter).

    in_place=False passes each layer its cache slice (scan xs -> ys), which rewrites
    every cache array. in_place=True carries the stacked caches and each layer writes
    its new rows into them, so a decode step costs O(new rows), not O(cache size).
    Returns (x, new caches, the unit's blocks' side outputs (see Block) stacked over the
    segment's repetitions; empty dicts with in_place=True, where there are none).
    """
    graphdefs, params = zip(*(nnx.split(block) for block in stack))

    def run_unit(x, unit_params, unit_caches, layer):
        new_caches, sides = [], []
        for graphdef, p, c in zip(graphdefs, unit_params, unit_caches):
            x, c, side = nnx.merge(graphdef, p)(x, token_ids, c, start, lengths, layer, valid, docs, indexer_kl)
            new_caches.append(c)
            sides.append(side)
        return x, new_caches, sides

    if in_place:
        def body(carry, unit_params):
            x, unit_caches, layer = carry
            x, unit_caches, _ = run_unit(x, unit_params, unit_caches, layer)
            return (x, unit_caches, layer + 1), None
    else:
        def body(x, slices):
            x, new_caches, sides = run_unit(x, *slices, None)
            return x, (new_caches, sides)

    if remat:
        body = jax.checkpoint(body)
    if in_place:
        (x, new_caches, _), _ = jax.lax.scan(body, (x, list(caches), jnp.int32(0)), list(params))
        return x, new_caches, [{} for _ in stack]
    x, (new_caches, sides) = jax.lax.scan(body, x, (list(params), caches))
    return x, new_caches, sides
