"""Speculative decoding with the MTP block as the draft model (spec §2.12), exact to plain decoding.

A verify step feeds each decoding sequence two tokens from its position p: the
pending token x_p (already decided) and the draft d for p + 1 that the MTP block
proposed. The main model's logits at p decide d (rejection sampling, Leviathan et
al. 2023 / Chen et al. 2023: accept with probability min(1, p(d) / q(d)), else draw
from norm(max(p - q, 0)), so the kept token follows p exactly whatever q is;
greedy rows use one-hot p and q, which makes this "accept iff d is the argmax").
If d is kept, the logits at p + 1 give one more token for free.

A rejected draft must leave no trace in the decode state. The verify chunk writes
both tokens; `snapshot` copies, before the step, the few rows the draft at
position r = p + 1 can overwrite and `rollback` puts the state back to what a plain
one-token step of x_p leaves:

- window ring: slot r mod W held position r - W; it is restored from the snapshot.
- compressor carries (the slots of the group holding the next position, and the
  one before for the overlapping ratio-4 compressor; see compressor.next_carry):
  if r + 1 is in r's group, the carry after the chunk covers the same groups as the
  carry after x_p alone and differs from it only in r's slot, which is reset to the
  empty fill (0 / EMPTY_SCORE) that ext_layout puts at unseen positions. If r ends
  its group (r + 1 starts the next), the carry after x_p alone covers the groups of
  the carry *before* the step, plus x_p's slot, which the new carry still holds for
  the overlapping compressor (its window starts one group back); for the
  non-overlapping one it does not, so `may_draft` never drafts at those positions
  (one step in `ratio`, with ratio >= 128 there).
- compressed entries and indexer keys: only a group ending at r is written with
  the draft in it; that row is restored from the snapshot.
- the MTP block's own window: it runs after the decision, on the kept tokens only.

Everything else the chunk computes for r is causal (no earlier row reads it), so
nothing more can differ. The tests compare every array of the state with plain
decoding's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.compressor import EMPTY_SCORE
from v4jax.config import ModelConfig
from v4jax.model import collapse_and_project
from v4jax.sampling import draw, token_keys, token_probs

# Streams folded into a token's key, so every random choice of a step is independent.
ACCEPT, RESIDUAL, TARGET, DRAFT = range(4)

CARRIES = (("kv_state", "score_state"), ("index_kv_state", "index_score_state"))


def purpose_keys(keys, positions, purpose: int):
    """[batch] sequence keys, positions of the token decided -> [batch] keys for one kind of draw."""
    return jax.vmap(lambda k: jax.random.fold_in(k, purpose))(token_keys(keys, positions))


def accept_or_resample(p, q, draft, accept_keys, residual_keys):
    """Rejection step of speculative sampling for one drafted token per sequence.

    p: target probs [batch, vocab]; q: draft probs [batch, vocab] the draft was drawn
    from; draft: [batch]. Returns (accepted [batch] bool, the token kept [batch]:
    the draft, or a draw from norm(max(p - q, 0))). The kept token is distributed as p.
    """
    pd = jnp.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    qd = jnp.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    u = jax.vmap(jax.random.uniform)(accept_keys)
    accepted = u * qd < pd  # u < p/q without dividing by a tiny q
    residual = jnp.maximum(p - q, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, p)  # p == q: never rejected anyway
    return accepted, jnp.where(accepted, draft, draw(residual, residual_keys))


def may_draft(cfg: ModelConfig, pos, max_len: int):
    """Whether a sequence at `pos` (an int, or an array of them) may verify a draft at pos + 1 (see the
    module docstring)."""
    ok = pos + 2 <= max_len
    for m in {m for m in cfg.compress_ratios[:cfg.num_hidden_layers] if m and m != 4}:
        ok = ok & ((pos + 2) % m != 0)
    return ok


def _row(a, index):
    """a: [reps, batch, N, w], index: [batch] -> [reps, batch, w]."""
    return a[:, jnp.arange(a.shape[1]), index]


def _put(a, index, rows):
    return a.at[:, jnp.arange(a.shape[1]), index].set(rows)


def snapshot(cfg: ModelConfig, layers, last):
    """The rows a draft at position last [batch] can overwrite, per layer (before the verify step)."""
    out = []
    for seg, seg_cache in zip(cfg.layer_plan, layers):
        unit_out = []
        for kind, arrays in zip(seg.unit, seg_cache):
            snap = {"window": _row(arrays["window"], last % cfg.sliding_window)}
            for name in ("entries", "index_keys"):
                if name in arrays:
                    snap[name] = _row(arrays[name], jnp.clip(last // kind.ratio, 0, arrays[name].shape[2] - 1))
            if kind.overlap:
                for pair in CARRIES:
                    snap.update({n: arrays[n] for n in pair if n in arrays})
            unit_out.append(snap)
        out.append(unit_out)
    return out


def rollback(cfg: ModelConfig, layers, snap, last, rejected):
    """Undo the draft at position last [batch] in rows `rejected` [batch] bool (see the module docstring)."""
    b = jnp.arange(last.shape[0])
    new_layers = []
    for seg, seg_cache, seg_snap in zip(cfg.layer_plan, layers, snap):
        unit_out = []
        for kind, arrays, saved in zip(seg.unit, seg_cache, seg_snap):
            arrays = dict(arrays)
            sel = rejected[None, :, None]
            slot = last % cfg.sliding_window
            arrays["window"] = _put(arrays["window"], slot, jnp.where(sel, saved["window"], _row(arrays["window"], slot)))
            m = kind.ratio
            if m:
                ends = (last + 1) % m == 0  # the draft completed a group
                group = jnp.clip(last // m, 0, arrays["entries"].shape[2] - 1)
                for name in ("entries", "index_keys"):
                    if name in arrays:
                        keep = jnp.where((rejected & ends)[None, :, None], saved[name], _row(arrays[name], group))
                        arrays[name] = _put(arrays[name], group, keep)
                g_next = (last + 1) // m  # group of the position after the chunk
                for pair in CARRIES:
                    for name, fill in zip(pair, (0.0, EMPTY_SCORE)):
                        if name not in arrays:
                            continue
                        new = arrays[name]  # [reps, batch, slots, w]
                        back = m if kind.overlap else 0  # the carry window starts one group back
                        unseen = new.at[:, b, jnp.clip(last - g_next * m + back, 0, new.shape[2] - 1)].set(fill)
                        fixed = jnp.where((rejected & ~ends)[None, :, None, None], unseen, new)
                        if kind.overlap:  # r ended its group: the old carry plus x_p's slot
                            x_p = last - 1
                            src = jnp.clip(x_p - (g_next - 1) * m, 0, new.shape[2] - 1)
                            dst = jnp.clip(x_p - (x_p // m - 1) * m, 0, new.shape[2] - 1)
                            old = saved[name].at[:, b, dst].set(new[:, b, src])
                            fixed = jnp.where((rejected & ends)[None, :, None, None], old, fixed)
                        arrays[name] = fixed
            unit_out.append(arrays)
        new_layers.append(unit_out)
    return new_layers


def verify_step(model, state, ids, lengths, drafted, follow, q, controls):
    """One step of a speculative batch: prefill chunks, verify steps and idle rows together.

    ids: [batch, T]; lengths: [batch] tokens fed; drafted: [batch] bool, the last fed
    token is a draft to decide (lengths 2: pending token, draft); follow: [batch] the
    token after the chunk where it is known (a prompt continues), else -1 (drawn here);
    q: [batch, vocab] draft probs of the drafted rows. Returns (the token drawn after
    the kept ones [batch], accepted [batch] bool, the next draft [batch], its probs
    [batch, vocab], the new state).
    """
    cfg = model.cfg
    start = state["pos"]
    last = start + lengths - 1  # a drafted row's draft position
    saved = snapshot(cfg, state["layers"], last)
    x, state = model.streams(ids, state, lengths)
    head = model.head.weight[...]
    logits = collapse_and_project(model, model.norm, head, x, cfg)  # [batch, T, vocab]
    settings = (controls.temperature, controls.top_k, controls.top_p)

    def probs_at(lg, index):
        return token_probs(jnp.take_along_axis(lg, jnp.maximum(index, 0)[:, None, None], axis=1)[:, 0], *settings)

    n_draft = drafted.astype(jnp.int32)
    p_draft = probs_at(logits, lengths - 1 - n_draft)  # decides the draft (or, undrafted, the next token)
    p_after = probs_at(logits, lengths - 1)
    draft = jnp.take_along_axis(ids, jnp.maximum(lengths - 1, 0)[:, None], axis=1)[:, 0]
    accepted, kept_token = accept_or_resample(p_draft, q, draft, purpose_keys(controls.keys, last, ACCEPT),
                                              purpose_keys(controls.keys, last, RESIDUAL))
    accepted = accepted & drafted
    fresh = draw(p_after, purpose_keys(controls.keys, start + lengths, TARGET))
    token = jnp.where(drafted & ~accepted, kept_token, fresh)
    kept = lengths - n_draft + accepted
    layers = rollback(cfg, state["layers"], saved, last, drafted & ~accepted)
    state = {**state, "pos": start + kept, "layers": layers}

    # MTP: position t sees the main streams at t and the token at t + 1; it predicts t + 2.
    tail = jnp.where(follow >= 0, follow, token)
    next_ids = jnp.concatenate([ids[:, 1:], jnp.zeros_like(ids[:, :1])], axis=1)
    next_ids = next_ids.at[jnp.arange(ids.shape[0]), jnp.maximum(kept - 1, 0)].set(tail)
    embed = model.embed.weight[...]
    mtp_logits, state["mtp"] = model.mtp[0].predict(x, embed[next_ids], next_ids, head, state["mtp"], start, kept)
    q_next = probs_at(mtp_logits, kept - 1)
    next_draft = draw(q_next, purpose_keys(controls.keys, start + kept + 1, DRAFT))
    return token, accepted, next_draft, q_next, state


def make_verify_step(graphdef):
    """verify_step over split parameters: (params, state, ...) -> as verify_step."""
    def step(params, state, *args):
        return verify_step(nnx.merge(graphdef, params), state, *args)
    return step
