"""Variable types and their logical axes.

Every array a module owns carries `logical_axes` metadata (one name or None per
dim, e.g. ("exp", "mlp_moe", "embed_moe")); `v4jax.sharding` maps the names to
mesh axes through a rules table, so placement is data next to the shape. Stacked
(scanned) layers add leading dims that the resolver names "layers".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Quantized(nnx.Variable):
    """FP8/FP4 codes and their block scales, kept as stored in the checkpoint: never trained."""


class Constant(nnx.Variable):
    """Model data that is not learned by gradient descent (the hash routing table)."""


class RouterBias(nnx.Variable):
    """Aux-loss-free routing bias: used only for expert selection; no gradient moves it, only
    `v4jax.train.update_router_biases` (the sign-of-load rule after an optimiser step)."""


def param(value, axes: tuple[str | None, ...], kind: type[nnx.Variable] = nnx.Param) -> nnx.Variable:
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match shape {value.shape}")
    return kind(value, logical_axes=tuple(axes))


def is_traced(rngs: nnx.Rngs) -> bool:
    """Whether `rngs` holds a traced key (construction under jit, eval_shape or vmap)."""
    return isinstance(rngs.params.key[...], jax.core.Tracer)


# Eager draws are flat, of power-of-two sizes from 2^16 up: two or three programs serve a tiny
# model, and a small tensor's oversized draw costs about a millisecond, not a compile.
MIN_FLAT_DRAW = 1 << 16


def prefix_exact(key) -> bool:
    """Whether draws from `key` of a flat size are prefixes of larger ones (partitionable threefry)."""
    return str(jax.random.key_impl(key)) == "threefry2x32" and jax.config.jax_threefry_partitionable


def normal(rngs: nnx.Rngs, shape, std: float, dtype):
    """`(std * jax.random.normal(rngs.params(), shape)).astype(dtype)`.

    Traced, that expression itself (drawn where its program places it). Eager, the same values
    bit for bit, without the program per shape the expression compiles (about 0.1 s of XLA
    each, some 60 per tiny model): the draw is the prefix of a flat one (threefry's bits are a
    function of the flat index alone), and the scale and cast are done in numpy (the same
    float32 multiply and round-to-nearest-even casts).
    """
    key = rngs.params()
    if isinstance(key, jax.core.Tracer) or not prefix_exact(key):
        return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    size = math.prod(shape)
    flat = np.asarray(jax.random.normal(key, (max(MIN_FLAT_DRAW, 1 << (size - 1).bit_length()),), jnp.float32))
    return jax.device_put((flat[:size].reshape(shape) * np.float32(std)).astype(dtype))
