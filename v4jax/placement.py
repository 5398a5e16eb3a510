"""The V4 model and its decode caches on a mesh: born sharded, or placed by the rules.

The mechanism (resolver, rule tables, placing any module or tree) is `v4jax.sharding`,
which knows no model; this module is the layer above the model that applies it to the
Transformer and its caches.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from v4jax.cache import cache_axes, init_cache
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.sharding import place, state_shardings, tree_shardings
from v4jax.sharding.placement import Rules


def create_sharded_model(cfg: ModelConfig, mesh: Mesh, rules: Rules, seed: int = 0) -> Transformer:
    """Initialise a Transformer born sharded: one jit whose outputs land on their shards.

    No device (or host) ever holds a whole parameter, so models larger than one
    device can be created; the values equal `Transformer(cfg, rngs=nnx.Rngs(seed))`.
    """
    def build():
        return Transformer(cfg, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()), out_shardings=state_shardings(abstract, mesh, rules))()
    return nnx.merge(graphdef, state)


def cache_shardings(state: dict, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings for every array of a decode state (concrete or abstract)."""
    return tree_shardings(state, cache_axes(state), mesh, rules, "cache")


def shard_cache(state: dict, mesh: Mesh, rules: Rules) -> dict:
    """A decode state placed on the mesh (abstract leaves get their sharding attached)."""
    return place(state, cache_shardings(state, mesh, rules))


def create_sharded_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: Mesh, rules: Rules) -> dict:
    """An empty decode state born sharded (no host copy of the whole cache)."""
    abstract = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    return jax.jit(lambda: init_cache(cfg, batch, max_len), out_shardings=cache_shardings(abstract, mesh, rules))()
