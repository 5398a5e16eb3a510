"""RMS normalisation (spec §2.10): computed in float32, cast back to the input dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.params import param
from v4jax.quant import round_to


def rms_normalize(x, eps: float, axis=-1):
    """x / RMS(x) over `axis` (the last dim, or a tuple of dims), in float32 (weightless: per-head
    q norm, mHC input)."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + eps)


def rms_norm(x, weight, eps: float):
    """RMSNorm_w(x) = w * x / RMS(x); float32 math with the weight upcast, output in x's dtype."""
    return round_to(rms_normalize(x, eps) * weight.astype(jnp.float32), x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, axes: tuple[str | None, ...]):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), dtype), axes)

    def __call__(self, x):
        return rms_norm(x, self.weight[...], self.eps)
