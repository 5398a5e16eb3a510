"""Placing parameters, caches and checkpoint tensors on a mesh by their logical axes.

Parameters carry `logical_axes` metadata; stacked (scanned) layers add leading
dims that are named "layers". Caches take their axes from `v4jax.cache.cache_axes`.
Every function here goes through the one resolver (`rules.logical_to_spec`), so a
rule that cannot be honoured raises, naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from v4jax.checkpoint import weights
from v4jax.cache import cache_axes, init_cache
from v4jax.config import ModelConfig
from v4jax.sharding.rules import MeshAxes, get_rules, logical_to_spec

Rules = str | Mapping[str, MeshAxes]


def param_axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """Logical axes of a (possibly stacked) parameter: leading stacked dims are "layers"."""
    axes = tuple(var.get_metadata()["logical_axes"])
    return ("layers",) * (len(var.get_value().shape) - len(axes)) + axes


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules) -> nnx.State:
    """A state of the same structure whose Variables hold NamedShardings (for jit in/out_shardings)."""
    rules = get_rules(rules)

    def one(path, var):
        name = ".".join(map(str, path))
        return var.replace(NamedSharding(mesh, logical_to_spec(param_axes(var), var.get_value().shape, mesh, rules,
                                                               f"parameter {name}")))

    return nnx.map_state(one, state)


def _place(tree, shardings):
    """device_put concrete leaves; attach the sharding to abstract (ShapeDtypeStruct) leaves."""
    def one(x, s):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return jax.device_put(x, s)

    return jax.tree.map(one, tree, shardings)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules) -> nnx.Module:
    """Move a model's parameters onto the mesh, in place (returns the model).

    An abstract model (from `nnx.eval_shape`) gets ShapeDtypeStructs that carry their
    sharding instead: the target to restore a checkpoint onto (Orbax) or to lower with.
    """
    state = nnx.state(model)
    nnx.update(model, _place(state, state_shardings(state, mesh, rules)))
    return model


def create_sharded_model(cfg: ModelConfig, mesh: Mesh, rules: Rules, seed: int = 0) -> nnx.Module:
    """Initialise a Transformer born sharded: one jit whose outputs land on their shards.

    No device (or host) ever holds a whole parameter, so models larger than one
    device can be created; the values equal `Transformer(cfg, rngs=nnx.Rngs(seed))`.
    """
    from v4jax.model import Transformer  # v4jax.model imports this package

    def build():
        return Transformer(cfg, rngs=nnx.Rngs(seed))

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.jit(lambda: nnx.state(build()), out_shardings=state_shardings(abstract, mesh, rules))()
    return nnx.merge(graphdef, state)


def cache_shardings(state: dict, mesh: Mesh, rules: Rules) -> dict:
    """NamedShardings for every array of a decode state (concrete or abstract)."""
    rules = get_rules(rules)

    def one(path, axes, x):
        what = f"cache {jax.tree_util.keystr(path)}"
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules, what))

    return jax.tree_util.tree_map_with_path(one, cache_axes(state), state, is_leaf=lambda a: isinstance(a, tuple))


def shard_cache(state: dict, mesh: Mesh, rules: Rules) -> dict:
    """A decode state placed on the mesh (abstract leaves get their sharding attached)."""
    return _place(state, cache_shardings(state, mesh, rules))


def create_sharded_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: Mesh, rules: Rules) -> dict:
    """An empty decode state born sharded (no host copy of the whole cache)."""
    abstract = jax.eval_shape(lambda: init_cache(cfg, batch, max_len))
    return jax.jit(lambda: init_cache(cfg, batch, max_len), out_shardings=cache_shardings(abstract, mesh, rules))()


def checkpoint_sharding(model: nnx.Module, mesh: Mesh, rules: Rules) -> Callable[[str, tuple], NamedSharding]:
    """`sharding_for(name, shape)` for the converter / loader: where a flat checkpoint tensor goes.

    `name` is a flat model-layout name (`layers.7.ffn.experts.w1.weight`); `shape` its
    shape, with any leading stacked dims (named "layers", replicated). `model` may be
    abstract (nnx.eval_shape).
    """
    rules = get_rules(rules)
    axes = weights.flat_axes(model)

    def sharding_for(name: str, shape: tuple) -> NamedSharding:
        if name not in axes:
            raise KeyError(f"tensor {name} is not a parameter of the model")
        full = ("layers",) * (len(shape) - len(axes[name])) + tuple(axes[name])
        return NamedSharding(mesh, logical_to_spec(full, shape, mesh, rules, f"tensor {name}"))

    return sharding_for


def bytes_per_device(tree) -> int:
    """Bytes one device holds of a tree of sharded (concrete or abstract) arrays.

    Shards are equal in size: the resolver only accepts dims that divide evenly.
    """
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def fetch(x) -> np.ndarray:
    """The whole value of an array on every process: a plain read where this process holds all of
    it, an all-gather across processes where it spans several (`jax.distributed`). A collective
    there, so every process must fetch the same arrays in the same order."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
