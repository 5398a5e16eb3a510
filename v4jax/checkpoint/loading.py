"""`load_pretrained`: a ready model from a published checkpoint folder or a converted Orbax folder.

Nothing is materialised whole on the host, nor twice on the devices: the model is
built abstractly, each checkpoint leaf is read straight onto its sharding
(published: streamed from the memory-mapped safetensors; converted: restored by
Orbax in bounded batches onto the target shardings, whatever mesh it was written
from) and written into its layer's slot of the scan stack before the next arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from v4jax.checkpoint import weights
from v4jax.checkpoint.converter import converted_config, iter_flat, iter_model_layout
from v4jax.checkpoint.reader import read_published
from v4jax.model import Transformer
from v4jax.sharding import get_rules, logical_to_spec, shard_model


def checkpoint_sharding(model: nnx.Module, mesh: Mesh, rules="inference") -> Callable[[str, tuple], NamedSharding]:
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


def checkpoint_shardings(model: nnx.Module, mesh: Mesh, rules="inference"):
    """sharding_for(name, shape) for checkpoint leaves: model parameters by the rules; the FP8
    scales a dequantised checkpoint keeps only for export are replicated."""
    for_model, params = checkpoint_sharding(model, mesh, rules), set(weights.flat_names(model))
    replicated = NamedSharding(mesh, PartitionSpec())
    return lambda name, shape: for_model(name, shape) if name in params else replicated


def load_pretrained(path: str | Path, mesh: Mesh | None = None, rules="inference", *, dtype: str | None = None,
                    quantized: bool | None = None, quant_sim: bool = True, remat: bool = False,
                    moe_impl: str | None = None) -> Transformer:
    """Build a Transformer holding the weights at `path`, placed on `mesh` by `rules` (None: one device).

    `dtype` and `quantized` (keep FP8/FP4 codes) default to bfloat16 / dequantised for a
    published folder and to what a converted folder was converted with; `moe_impl` (None: the
    backend's) as `ModelConfig.moe_impl`.
    """
    path = Path(path)
    published = (path / "model.safetensors.index.json").is_file()
    if published:
        source = read_published(path)
        cfg = source.cfg.replace(dtype=dtype or "bfloat16", quantized=bool(quantized), quant_sim=quant_sim,
                                 remat=remat, moe_impl=moe_impl)
    else:
        cfg = converted_config(path)
        cfg = cfg.replace(dtype=dtype or cfg.dtype, quant_sim=quant_sim, remat=remat, moe_impl=moe_impl,
                          quantized=cfg.quantized if quantized is None else quantized)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    sharding_for = checkpoint_shardings(model, mesh, rules) if mesh is not None else None
    if published:
        flat = iter_model_layout(source, cfg, keep_quantized=cfg.quantized, sharding_for=sharding_for)
    else:
        default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = {name: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                               sharding=sharding_for(name, s.shape) if sharding_for else default)
                    for name, s in weights.flat_abstract(model).items()}
        flat = iter_flat(path, abstract)
    weights.load_flat(model, flat)  # leaf by leaf into the scan stacks: never the model twice
    if mesh is not None:
        shard_model(model, mesh, rules)  # moves nothing unless the rules split the stacked "layers" axis
    return model
