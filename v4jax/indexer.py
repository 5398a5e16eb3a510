"""Lightning indexer (spec §2.6): picks, per query, the top-k compressed entries of a CSA layer.

Scores I(t, i) = Σ_h w_h · ReLU(q_h · k_i) over H_I small heads; the indexer has
its own overlapping compressor (entry width index_head_dim) whose keys share the
entry numbering of the main compressed cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.compressor import Compressor
from v4jax.config import ModelConfig
from v4jax.linear import Linear
from v4jax.rope import apply_rope
from v4jax.sharding import top_k


def indexer_scores(q, k, w):
    """q: [batch, Tq, H_I, d_I], k: [batch, N, d_I], w: [batch, Tq, H_I] -> [batch, Tq, N] in w's dtype.

    In the activation dtype as the reference (bf16 by default: its top-k is twice as
    fast at 99.7% recall, V4 report): the dots, their weighted ReLUs and the head sum
    are each rounded once (float32 accumulation); float32 activations stay float32.
    """
    dtype = w.dtype
    dots = jnp.einsum("bqhd,bnd->bqhn", q, k, preferred_element_type=jnp.float32).astype(dtype)
    # The head sum as a chain of adds over [batch, Tq, N] slices: XLA:CPU runs a reduce over the
    # short head axis about 4x slower than the dots themselves (measured at 8K tokens).
    heads = (jax.nn.relu(dots[:, :, h]) * w[:, :, h, None] for h in range(dots.shape[2]))
    return sum(x.astype(jnp.float32) for x in heads).astype(dtype)


def select_topk(scores, visible, k: int):
    """Indices of the k best visible entries per query, and which of the k slots are real.

    scores, visible: [batch, Tq, N]. With fewer than k visible entries the extra
    slots are marked invalid (the reference's -1 slots).
    """
    k = min(k, scores.shape[-1])
    best, idx = top_k(jnp.where(visible, scores, -jnp.inf), k, ("batch", None, "cache_seq"))
    return idx, best > -jnp.inf


def prefix_widths(n_entries: int, k: int, steps: int) -> tuple[int, ...]:
    """The prefixes of the compressed entries the indexer may score, ascending: `steps` even
    steps up to n_entries, none shorter than the top-k (so every width yields k slots)."""
    k = min(k, n_entries)
    return tuple(sorted({max(k, -(-n_entries * j // steps)) for j in range(1, steps + 1)}))


def select_visible_topk(q, keys, w, visible, k: int, n_visible, widths: tuple[int, ...]):
    """select_topk over indexer_scores of only the first W entries, W the shortest of `widths`
    holding the n_visible that any query may see: the same slots as scoring every entry.

    q: [batch, Tq, H_I, d_I], keys: [batch, N, d_I], w: [batch, Tq, H_I], visible: [batch, Tq, N]
    (nothing visible past n_visible), n_visible: [] int. Early query blocks of a long prefill (and
    decode steps early in a long cache) see few entries; scoring and ranking all N would cost each
    of them the whole cache's width. Returns idx, valid and the chosen slots' scores, [batch, Tq, k]
    each (invalid slots as select_topk's: the lowest-numbered unseen entries, within any width >= k).
    """

    def over(width):
        def scored(q, keys, w, visible):
            scores = indexer_scores(q, keys[:, :width], w)
            idx, valid = select_topk(scores, visible[..., :width], k)
            return idx, valid, jnp.take_along_axis(scores, idx, axis=-1)

        return scored

    branch = jnp.searchsorted(jnp.asarray(widths), n_visible)  # the first width >= n_visible
    return jax.lax.switch(branch, [over(width) for width in widths], q, keys, w, visible)


def hadamard_rotate(x):
    """x: [..., n] -> x H_n n^-1/2 (orthonormal Sylvester rotation) in x's dtype.

    As the reference's transform kernel: the +-1 transform in float32 (exact sums for
    bf16 inputs of moderate range), then the float32 scale, one rounding to x's dtype.
    """
    n = x.shape[-1]
    pm = jnp.asarray(quant.sylvester_hadamard(n))
    rotated = jnp.einsum("...d,de->...e", x.astype(jnp.float32), pm, preferred_element_type=jnp.float32)
    return (rotated * jnp.float32(n**-0.5)).astype(x.dtype)


def rotate_and_quantize(x, enabled: bool):
    """Hadamard rotation + FP4 fake-quant of indexer queries/keys; the rotation
    preserves dot products, so it only matters together with the rounding."""
    if not enabled:
        return x
    return quant.fake_quant_fp4(hadamard_rotate(x))


class Indexer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.quant_sim = cfg.quant_sim
        self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, cfg, rngs, ("index_heads", "q_lora"),
                           fp8=True)
        self.weights_proj = Linear(cfg.hidden_size, self.n_heads, cfg, rngs, ("index_heads", "embed"), fp8=False)
        self.compressor = Compressor(cfg, 4, self.head_dim, rngs)

    def keys(self, entries):
        """Post-process indexer compressor entries into cached keys."""
        return rotate_and_quantize(entries, self.quant_sim)

    def queries(self, x, q_lat, positions, inv_freq):
        """-> q: [batch, T, H_I, d_I], head weights: [batch, T, H_I] (both in x's dtype)."""
        b, t, _ = x.shape
        q = self.wq_b(q_lat).reshape(b, t, self.n_heads, self.head_dim)
        q = rotate_and_quantize(apply_rope(q, positions[..., None], inv_freq), self.quant_sim)
        w = self.weights_proj(x) * (self.head_dim**-0.5 * self.n_heads**-0.5)
        return q, w
