"""Placing any NNX module's parameters and any tree of arrays on a mesh by their logical axes.

Parameters carry `logical_axes` metadata; stacked (scanned) layers add leading
dims that are named "layers". Every function here goes through the one resolver
(`rules.logical_to_spec`), so a rule that cannot be honoured raises, naming the
tensor. Nothing here knows the V4 model: placing the Transformer and its decode
caches is `v4jax.placement`, one layer up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

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


def place(tree, shardings):
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
    nnx.update(model, place(state, state_shardings(state, mesh, rules)))
    return model


def tree_shardings(tree, axes, mesh: Mesh, rules: Rules, what: str = "array"):
    """NamedShardings for a tree of (concrete or abstract) arrays, given a same-structured tree of
    logical-axes tuples."""
    rules = get_rules(rules)

    def one(path, names, x):
        return NamedSharding(mesh, logical_to_spec(names, x.shape, mesh, rules, f"{what} {jax.tree_util.keystr(path)}"))

    return jax.tree_util.tree_map_with_path(one, axes, tree, is_leaf=lambda a: isinstance(a, tuple))


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
