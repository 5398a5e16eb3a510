"""Variable types and their logical axes.

Every array a module owns carries `logical_axes` metadata (one name or None per
dim, e.g. ("exp", "mlp_moe", "embed_moe")); `v4jax.sharding` maps the names to
mesh axes through a rules table, so placement is data next to the shape. Stacked
(scanned) layers add leading dims that the resolver names "layers".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def normal(rngs: nnx.Rngs, shape, std: float, dtype):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
