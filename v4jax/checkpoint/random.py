"""Random checkpoints in exactly the published layout, for any config (tests, benchmarks).

Same files, names, dtypes, shapes, split and index as a real release; quantised
tensors are real encodings (power-of-two scales) of small normal weights, the
hash-routing tables hold distinct valid expert ids, norms are near one and the
mHC parameters, sinks and biases near zero, so a tiny model built from it runs
numerically sane. Every tensor has its own generator seeded from (seed, name).
"""

from __future__ import annotations

import dataclasses
import zlib
from pathlib import Path

import numpy as np

from v4jax.checkpoint.layout import INDEX, FileLayout, config_text
from v4jax.checkpoint.model_layout import PlainUnit, QuantizedUnit, encode, units
from v4jax.checkpoint.safetensors_format import ShardWriter
from v4jax.checkpoint.staging import staging
from v4jax.config import ModelConfig
from v4jax.checkpoint.inventory import TensorSpec, published_tensors

WEIGHT_STD = 0.02


def write_random_checkpoint(cfg: ModelConfig | str | Path, out_dir: str | Path, seed: int = 0,
                            shard_bytes: int | None = None) -> Path:
    """Write a published-layout checkpoint of random weights to `out_dir`.

    `cfg` is a config or the path of a `config.json` (copied byte for byte);
    `shard_bytes` packs consecutive layers into files of up to that size (None: one
    layer per file, as published).
    """
    if isinstance(cfg, ModelConfig):
        config_bytes = config_text(cfg).encode()
    else:
        path = Path(cfg) / "config.json" if Path(cfg).is_dir() else Path(cfg)
        cfg = ModelConfig.from_json(path)  # first: it reads only a regular file
        config_bytes = path.read_bytes()
    layout = FileLayout.published(cfg, shard_bytes)
    specs = {s.name: s for s in published_tensors(cfg)}
    shard_of = {name: shard.file for shard in layout.shards for name in shard.tensors}
    by_shard: dict[str, list[PlainUnit | QuantizedUnit]] = {}
    for unit in units(cfg):
        for member in _split(unit):
            first = member.spec.name if isinstance(member, PlainUnit) else member.members[0] + ".weight"
            by_shard.setdefault(shard_of[first], []).append(member)
    with staging(Path(out_dir)) as tmp:
        (tmp / "config.json").write_bytes(config_bytes)
        for shard in layout.shards:
            with ShardWriter(tmp / shard.file, [specs[n] for n in shard.tensors], shard.metadata) as writer:
                for unit in by_shard[shard.file]:
                    for name, array in encode(unit, _random_leaves(unit, cfg, seed)):
                        writer.write(name, array)
        (tmp / INDEX).write_text(layout.index_text(specs))
    return Path(out_dir)


def _split(unit: PlainUnit | QuantizedUnit) -> list[PlainUnit | QuantizedUnit]:
    """Expert stacks one expert at a time, so memory stays at one tensor."""
    if isinstance(unit, QuantizedUnit) and unit.stacked:
        return [dataclasses.replace(unit, name=m, members=(m,), stacked=False) for m in unit.members]
    return [unit]


def _random_leaves(unit: PlainUnit | QuantizedUnit, cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    if isinstance(unit, QuantizedUnit):  # dequantised values; encode picks the scales
        weight = WEIGHT_STD * _rng(seed, unit.name).standard_normal(unit.dequantised_shape, np.float32)
        return {unit.name + ".weight": weight}
    return {unit.spec.name: _plain(unit.spec, cfg, _rng(seed, unit.spec.name))}


def _plain(spec: TensorSpec, cfg: ModelConfig, rng: np.random.Generator) -> np.ndarray:
    if spec.name.endswith("tid2eid"):  # distinct experts per token
        return rng.random((spec.shape[0], cfg.n_routed_experts)).argsort(axis=1)[:, :spec.shape[1]]
    noise = WEIGHT_STD * rng.standard_normal(spec.shape, np.float32)
    return 1 + noise if spec.name.endswith("norm.weight") else noise


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])
