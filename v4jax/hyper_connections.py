"""Manifold-constrained hyper-connections (mHC, spec §2.2).

The residual stream is n_hc = 4 copies wide: X: [batch, seq, n_hc, dim]. Before each
sub-layer, `hc_pre` collapses the streams into one input with learned weights and
computes the residual mixer C (Sinkhorn-normalised, columns summing to ~1);
`hc_post` writes the sub-layer output back into every stream and mixes the old
streams with Cᵀ. All mixing math is float32, as in the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from v4jax.norms import rms_normalize
from v4jax.quant import round_to


def sinkhorn(logits, iters: int, eps: float):
    """logits: [..., n, n] -> approximately doubly stochastic [..., n, n].

    Order matters for bit parity: row softmax (+eps), column normalise, then
    `iters - 1` rounds of row then column normalisation; the last step is a column
    normalisation.
    """
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    for _ in range(iters - 1):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)
    return c


def hc_mixes(x, fn, norm_eps: float):
    """x: [..., n_hc, dim] -> fn · flatten(x) / RMS(flatten(x)): [..., rows] float32 (stream-major).

    Written over (n_hc, dim) rather than on the flattened [..., n_hc * dim], so that a dim split
    over devices (training rules: over `tensor`) stays split: the flattened form is gathered whole
    on every device (Flash at 64K tokens: 4 GB per buffer).
    """
    fn = fn.reshape(fn.shape[0], *x.shape[-2:]).astype(jnp.float32)  # [rows, n_hc, dim], stream-major
    return jnp.einsum("...nd,rnd->...r", rms_normalize(x, norm_eps, axis=(-2, -1)), fn)


def hc_pre(x, fn, base, scale, *, iters: int, hc_eps: float, norm_eps: float):
    """Collapse the streams for a sub-layer.

    x: [batch, seq, n, dim]; fn: [(2+n)*n, n*dim]; base: [(2+n)*n]; scale: [3].
    Returns y: [batch, seq, dim] (x's dtype), post: [batch, seq, n], comb: [batch, seq, n, n]
    where comb[j, k] weighs old stream j into new stream k.
    """
    n = x.shape[-2]
    mixes = hc_mixes(x, fn, norm_eps)
    pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + hc_eps
    post = 2 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
    comb_logits = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).reshape(*mixes.shape[:-1], n, n)
    comb = sinkhorn(comb_logits, iters, hc_eps)
    y = jnp.einsum("...j,...jd->...d", pre, x.astype(jnp.float32))
    return round_to(y, x.dtype), post, comb


def hc_post(o, x, post, comb):
    """X'[k] = post[k] * o + Σ_j comb[j, k] X[j]; o: [batch, seq, dim], x: [batch, seq, n, dim]."""
    mixed = jnp.einsum("...jk,...jd->...kd", comb, x.astype(jnp.float32))
    return round_to(post[..., None] * o.astype(jnp.float32)[..., None, :] + mixed, x.dtype)


def hc_head(x, fn, base, scale, *, hc_eps: float, norm_eps: float):
    """Final collapse of the streams (no Sinkhorn, no post): x: [..., n, dim] -> [..., dim]."""
    mixes = hc_mixes(x, fn, norm_eps)
    w = jax.nn.sigmoid(mixes * scale[0] + base) + hc_eps
    return round_to(jnp.einsum("...j,...jd->...d", w, x.astype(jnp.float32)), x.dtype)
