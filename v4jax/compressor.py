"""Token-level KV compressor (spec §2.5): every `ratio` tokens become one entry.

Ratio 4 (CSA) uses the overlapping form: entry i pools the previous group's
tokens through the first channel half (A) and its own group's tokens through the
second half (B), 2·ratio slots in all. Other ratios (HCA) pool their own group.
The softmax over slots is independent for every channel.

Everything is position based, so one code path serves a whole sequence, chunked
prefill from any position and single-token decode: the tokens of a chunk are laid
next to the carried projections of the groups the chunk continues ("ext" layout,
whole groups starting one group before the chunk's first group), complete groups
are pooled, and the projections of the last two groups become the new carry.

Packed rows (whole sequences holding several documents, each starting at a multiple
of the ratio) keep the row's groups, which are then the documents' own: an entry is
RoPE'd at its group's position inside the document, and the overlap of a group that
opens a document drops the previous group's slots, as for group 0 (training spec §8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.config import ModelConfig
from v4jax.linear import Linear, matmul_t
from v4jax.norms import RMSNorm
from v4jax.params import normal, param
from v4jax.rope import apply_rope

# Logit of an empty slot. Finite (not -inf) so a group with no valid slot pools to
# a finite, never-used value instead of NaN, which would poison gradients.
EMPTY_SCORE = -1e30


def pool_groups(a, z, ratio: int, overlap: bool, opens=None):
    """Per-channel softmax pooling of whole groups.

    a, z: [batch, K * ratio, kappa * c] float32 (K consecutive groups, ext layout).
    Returns [batch, K - 1, c]: entries of groups 1..K-1 (group 0 only feeds the
    overlap's A half). opens: [batch, K - 1] bool, entries whose group opens a
    document: their overlap has no previous-group slots.
    """
    b, n, width = a.shape
    groups = n // ratio
    a = a.reshape(b, groups, ratio, width)
    z = z.reshape(b, groups, ratio, width)
    if overlap:
        c = width // 2
        prev_z = z[:, :-1, :, :c]
        if opens is not None:
            prev_z = jnp.where(opens[:, :, None, None], EMPTY_SCORE, prev_z)
        # [batch, K-1, 2*ratio, c]: previous group's A half, then own group's B half.
        a = jnp.concatenate([a[:, :-1, :, :c], a[:, 1:, :, c:]], axis=2)
        z = jnp.concatenate([prev_z, z[:, 1:, :, c:]], axis=2)
    else:
        a, z = a[:, 1:], z[:, 1:]
    return jnp.sum(jax.nn.softmax(z, axis=2) * a, axis=2)


def ext_layout(new, carry, start, lengths, ratio: int, overlap: bool, fill: float):
    """Lay per-token values of a chunk next to the carried ones, in whole groups.

    new: [batch, T, w] (token t at position start + t, valid for t < lengths);
    carry: [batch, 2*ratio (overlap) or ratio, w] (slots of the previous and current
    group, or of the current group only). Returns [batch, K * ratio, w] with
    K = (ratio - 1 + T) // ratio + 2 groups starting at group start // ratio - 1;
    slots of positions not yet seen hold `fill`.
    """
    t_len = new.shape[1]
    k_groups = (ratio - 1 + t_len) // ratio + 2
    first = (start // ratio - 1) * ratio  # [batch] position of ext slot 0
    ext_pos = first[:, None] + jnp.arange(k_groups * ratio)  # [batch, K*ratio]
    t = ext_pos - start[:, None]
    from_new = (t >= 0) & (t < lengths[:, None])
    slot = ext_pos - first[:, None] - (0 if overlap else ratio)
    from_carry = (t < 0) & (slot >= 0)
    take = jax.vmap(lambda v, i: v[i])
    out = jnp.where(from_new[..., None], take(new, jnp.clip(t, 0, t_len - 1)),
                    take(carry, jnp.clip(slot, 0, carry.shape[1] - 1)))
    return jnp.where((from_new | from_carry)[..., None], out, fill)


def next_carry(ext, start, lengths, ratio: int, overlap: bool):
    """Carry after the chunk: the ext slots of the group holding the next position (and the one before)."""
    k_next = (start + lengths) // ratio - start // ratio + 1  # ext group of the next position
    first_group = k_next - 1 if overlap else k_next
    size = (2 if overlap else 1) * ratio
    return jax.vmap(lambda e, g: jax.lax.dynamic_slice_in_dim(e, g * ratio, size))(ext, first_group)


class Compressor(nnx.Module):
    """Owns wkv, wgate, ape and norm; `c` is the entry width (head_dim, or index_head_dim for the indexer's)."""

    def __init__(self, cfg: ModelConfig, ratio: int, c: int, rngs: nnx.Rngs):
        self.ratio = ratio
        self.overlap = ratio == 4
        width = (2 if self.overlap else 1) * c
        self.wkv = Linear(cfg.hidden_size, width, cfg, rngs, ("kv", "embed"), fp8=False)
        self.wgate = Linear(cfg.hidden_size, width, cfg, rngs, ("kv", "embed"), fp8=False)
        self.ape = param(normal(rngs, (ratio, width), 0.02, jnp.float32), (None, "kv"))
        self.norm = RMSNorm(c, cfg.rms_norm_eps, cfg.dtype, ("kv",))

    def __call__(self, x, start, lengths, carry_kv, carry_score, inv_freq, doc_positions=None):
        """x: [batch, T, dim] (the attention input), start/lengths: [batch].

        Returns entries [batch, K-1, c] (normalised, RoPE'd at their group's first
        position, x's dtype), their entry index [batch, K-1] (out of range where the
        group is not complete) and the new carries. doc_positions: [batch, T] positions
        inside the documents of a packed row (whole sequences: start 0), or None.
        """
        positions = start[:, None] + jnp.arange(x.shape[1])
        x32 = x.astype(jnp.float32)  # the reference runs both projections in float32
        a = matmul_t(x32, self.wkv.kernel(jnp.float32), jnp.float32)
        z = matmul_t(x32, self.wgate.kernel(jnp.float32), jnp.float32) + self.ape[...][positions % self.ratio]
        ext_a = ext_layout(a, carry_kv, start, lengths, self.ratio, self.overlap, 0.0)
        ext_z = ext_layout(z, carry_score, start, lengths, self.ratio, self.overlap, EMPTY_SCORE)
        n_pooled = ext_a.shape[1] // self.ratio - 1
        group = start[:, None] // self.ratio + jnp.arange(n_pooled)  # [batch, K-1]
        rope_pos, opens = group * self.ratio, None
        if doc_positions is not None:
            rope_pos = jnp.take_along_axis(doc_positions, jnp.minimum(rope_pos, x.shape[1] - 1), axis=1)
            opens = rope_pos == 0
        pooled = quant.round_to(pool_groups(ext_a, ext_z, self.ratio, self.overlap, opens), x.dtype)
        entries = apply_rope(self.norm(pooled), rope_pos, inv_freq)
        complete = (group + 1) * self.ratio <= (start + lengths)[:, None]
        return (entries, jnp.where(complete, group, jnp.iinfo(jnp.int32).max),
                next_carry(ext_a, start, lengths, self.ratio, self.overlap),
                next_carry(ext_z, start, lengths, self.ratio, self.overlap))
