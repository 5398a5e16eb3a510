"""Partial, interleaved rotary embedding with a per-layer base and YaRN (spec §2.3).

Only the trailing `qk_rope_head_dim` channels of a vector rotate; pairs are
adjacent channels (2i, 2i+1), GPT-J style. Layers with compress ratio 0 (and the
MTP block) use `rope_theta` without YaRN; compressed layers use
`compress_rope_theta` with YaRN always on, whatever the runtime length, and no
magnitude scaling (the reference applies none).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from v4jax.config import ModelConfig, RopeScaling


def yarn_ramp_bounds(rope_dim: int, base: float, scaling: RopeScaling) -> tuple[int, int]:
    """Pair indices [low, high] between which YaRN interpolates, clamped to [0, rope_dim - 1]."""

    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(base))

    low = math.floor(correction_dim(scaling.beta_fast))
    high = math.ceil(correction_dim(scaling.beta_slow))
    return max(low, 0), min(high, rope_dim - 1)


def rope_inv_freq(rope_dim: int, base: float, scaling: RopeScaling | None) -> np.ndarray:
    """Angular frequency per rotated pair: [rope_dim / 2] float32."""
    inv_freq = 1.0 / (base ** (np.arange(0, rope_dim, 2, dtype=np.float32) / rope_dim))
    if scaling is None:
        return inv_freq.astype(np.float32)
    low, high = yarn_ramp_bounds(rope_dim, base, scaling)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    # ramp 0 keeps the frequency (high-frequency pairs), ramp 1 divides it by the factor.
    return (inv_freq / scaling.factor * ramp + inv_freq * (1 - ramp)).astype(np.float32)


def layer_inv_freq(cfg: ModelConfig, ratio: int) -> np.ndarray:
    """The frequency table a layer with compress ratio `ratio` uses for every rotation in it."""
    if ratio == 0:
        return rope_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta, None)
    return rope_inv_freq(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.rope_scaling)


def apply_rope(x, positions, inv_freq, inverse: bool = False):
    """Rotate the trailing len(inv_freq)*2 channels of x.

    x: [..., dim] with positions broadcastable to x.shape[:-1] (e.g. x [batch, seq, heads, dim]
    with positions [batch, seq, 1]). Computed in float32 and cast back, as the reference's
    complex multiply. `inverse` rotates by -angle (output de-rotation).
    """
    rope_dim = 2 * inv_freq.shape[-1]
    angles = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [..., rope_dim/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if inverse:
        sin = -sin
    nope, rot = x[..., :-rope_dim], x[..., -rope_dim:].astype(jnp.float32)
    pairs = rot.reshape(*rot.shape[:-1], rope_dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return jnp.concatenate([nope, rotated.reshape(rot.shape).astype(x.dtype)], axis=-1)
