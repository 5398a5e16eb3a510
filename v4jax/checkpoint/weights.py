"""Model parameters <-> the flat "model layout" dict keyed by published tensor names.

The flat layout is what the converter writes and `load_pretrained` reads:
published names (`layers.7.attn.wq_a.weight`, `mtp.0.e_proj.weight`, ...), published
[out, in] orientation, routed experts stacked per projection
(`layers.7.ffn.experts.w1.weight`: [E, out, in]) and `attn.wo_a.weight` grouped
[G, r_o, H*d/G]. Inside the model, layers of one scan segment are stacked along a
leading axis; this module is the only place that knows how the two correspond.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from v4jax.config import ModelConfig


def _entries(model: nnx.Module) -> Iterator[tuple[str, tuple, nnx.Variable, int | None]]:
    """(flat name, state path, variable, rep index or None) for every array of the model."""
    cfg: ModelConfig = model.cfg
    plan = cfg.layer_plan
    for path, var in nnx.to_flat_state(nnx.state(model)):
        if path[0] == "layers":
            seg, unit, rest = plan[path[1]], path[2], ".".join(map(str, path[3:]))
            for rep in range(seg.reps):
                yield f"layers.{seg.layer(rep, unit)}.{rest}", path, var, rep
        else:
            yield ".".join(map(str, path)), path, var, None


def flat_names(model: nnx.Module) -> list[str]:
    return [name for name, *_ in _entries(model)]


def flat_axes(model: nnx.Module) -> dict[str, tuple]:
    """Logical axes of every flat leaf (the per-layer view: no stacked axis)."""
    return {name: var.get_metadata()["logical_axes"] for name, _, var, _ in _entries(model)}


def flat_abstract(model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every flat leaf the model holds."""
    out = {}
    for name, _, var, rep in _entries(model):
        v = var.get_value()
        shape = v.shape[1:] if rep is not None else v.shape
        out[name] = jax.ShapeDtypeStruct(shape, v.dtype)
    return out


def to_flat(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters as a flat model-layout dict."""
    return {name: (var.get_value()[rep] if rep is not None else var.get_value())
            for name, _, var, rep in _entries(model)}


def load_flat(model: nnx.Module, flat: Mapping[str, jax.Array] | Iterable[tuple[str, jax.Array]]) -> None:
    """Set every parameter of `model` from model-layout leaves, in place.

    `flat` is a dict or an iterable of (name, array) pairs, consumed one at a time: a
    leaf of a scanned parameter is written into its slot of the stack as it arrives, so
    loading holds the model plus one leaf, never the model twice. Extra entries (e.g. the
    FP8 scales a dequantised checkpoint keeps for export) are ignored; a missing entry or
    a shape/dtype mismatch raises naming the tensor.
    """
    entries = {name: (path, var, rep) for name, path, var, rep in _entries(model)}
    stacks: dict[tuple, tuple[nnx.Variable, jax.Array]] = {}  # state path -> (variable, stack being filled)
    seen = set()
    for name, value in flat.items() if isinstance(flat, Mapping) else flat:
        if name not in entries:
            continue
        path, var, rep = entries[name]
        v = var.get_value()
        want = v.shape[1:] if rep is not None else v.shape
        if tuple(value.shape) != tuple(want) or value.dtype != v.dtype:
            raise ValueError(f"parameter {name}: checkpoint has {value.dtype}{list(value.shape)}, "
                             f"model expects {v.dtype}{list(want)}")
        seen.add(name)
        if rep is None:
            var.set_value(value)
            continue
        if path not in stacks:  # [reps, ...] on the devices that hold the layers' leaves
            stacks[path] = var, jnp.zeros(v.shape, v.dtype, device=_stacked(getattr(value, "sharding", None)))
        stacks[path] = var, _put(stacks[path][1], value, rep)
    missing = [name for name in entries if name not in seen]
    if missing:
        raise KeyError(f"parameter {missing[0]} is missing from the checkpoint ({len(missing)} missing)")
    for var, stack in stacks.values():
        var.set_value(stack)


def _stacked(sharding: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    """The sharding of a stack of leaves placed by `sharding`: the new leading axis whole."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding


@functools.partial(jax.jit, donate_argnums=0)
def _put(stack, value, rep):
    """stack[rep] = value, in place (the stack is donated)."""
    return jax.lax.dynamic_update_index_in_dim(stack, value, rep, 0)
