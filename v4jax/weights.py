"""Model parameters <-> the flat "model layout" dict keyed by published tensor names.

The flat layout is what the converter writes and `load_pretrained` reads:
published names (`layers.7.attn.wq_a.weight`, `mtp.0.e_proj.weight`, ...), published
[out, in] orientation, routed experts stacked per projection
(`layers.7.ffn.experts.w1.weight`: [E, out, in]) and `attn.wo_a.weight` grouped
[G, r_o, H*d/G]. Inside the model, layers of one scan segment are stacked along a
leading axis; this module is the only place that knows how the two correspond.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

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


def load_flat(model: nnx.Module, flat: dict[str, jax.Array]) -> None:
    """Set every parameter of `model` from a flat model-layout dict, in place.

    Extra entries (e.g. the FP8 scales a dequantised checkpoint keeps for export)
    are ignored; a missing entry or a shape/dtype mismatch raises naming the tensor.
    """
    stacks: dict[tuple, list] = {}
    variables = {}
    for name, path, var, rep in _entries(model):
        if name not in flat:
            raise KeyError(f"parameter {name} is missing from the checkpoint")
        value = flat[name]
        v = var.get_value()
        want = v.shape[1:] if rep is not None else v.shape
        if tuple(value.shape) != tuple(want) or value.dtype != v.dtype:
            raise ValueError(f"parameter {name}: checkpoint has {value.dtype}{list(value.shape)}, "
                             f"model expects {v.dtype}{list(want)}")
        variables[path] = var
        if rep is None:
            var.set_value(value)
        else:
            stacks.setdefault(path, []).append(value)
    for path, values in stacks.items():
        variables[path].set_value(jnp.stack(values))
