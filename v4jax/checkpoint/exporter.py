"""Model layout -> published checkpoint folder (same names, dtypes, file split and index).

The source is a converted folder (its recorded file split and config are reused, so
an unmodified checkpoint comes back byte for byte) or an in-memory flat dict such
as `v4jax.checkpoint.weights.to_flat(model)` (the published split for its config; FP8 weights
without stored scales get fresh power-of-two ones). Leaves are loaded a batch at a
time and every published tensor is written at its final offset as soon as it is
encoded, so memory stays near one batch plus the largest leaf.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from v4jax.checkpoint.converter import LAYOUT, byte_batches, converted_config, load_flat
from v4jax.errors import CheckpointError
from v4jax.checkpoint.layout import INDEX, FileLayout, config_text
from v4jax.checkpoint.model_layout import (PlainUnit, QuantizedUnit, encode, first_non_finite, model_layout,
                                           non_finite_message, units)
from v4jax.checkpoint.reader import companion_files
from v4jax.checkpoint.safetensors_format import ShardWriter
from v4jax.checkpoint.staging import check_absent, check_outside, staging
from v4jax.config import ModelConfig
from v4jax.checkpoint.inventory import published_tensors

# Leaves restored per Orbax load (or one larger unit alone): bounds memory beyond the largest leaf.
_LOAD_BYTES = 256 * 2**20


def export(src: str | Path | Mapping[str, jax.Array], dst: str | Path, *, cfg: ModelConfig | None = None,
           companions: Sequence[Path] = (), progress: bool = True) -> Path:
    """Write the published checkpoint folder `dst` from a converted folder (with its companion
    files) or a flat dict (which needs `cfg`; `companions`: the checked files copied in beside
    the weights, inside the same staging). One process writes it: leaves are gathered on its
    host a batch at a time."""
    dst = Path(dst).absolute()
    check_absent(dst)
    if jax.process_count() > 1:
        raise CheckpointError(f"{dst}: export runs as a single process, not under jax.distributed "
                              f"({jax.process_count()} processes)")
    source = "flat dict" if isinstance(src, Mapping) else str(src)
    if isinstance(src, Mapping):
        if cfg is None:
            raise ValueError("export from a flat dict needs cfg")
        layout, config_bytes, companions = FileLayout.published(cfg), config_text(cfg).encode(), list(companions)
        sizes = {name: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for name, v in src.items()}
        load: Callable[[list[str]], dict] = lambda names: {n: np.asarray(src[n]) for n in names}
    else:
        folder = Path(src).absolute()
        check_outside(dst, folder)
        cfg = converted_config(folder)
        layout = FileLayout.from_json(folder / LAYOUT)
        config_bytes = (folder / "config.json").read_bytes()
        companions = companion_files(folder)
        stored = model_layout(cfg, cfg.quantized)
        sizes = {name: int(np.prod(s.shape)) * s.dtype.itemsize for name, s in stored.items()}
        load = lambda names: {n: np.asarray(v) for n, v in load_flat(folder, {n: stored[n] for n in names}).items()}

    specs = {s.name: s for s in published_tensors(cfg)}
    file_of = {name: shard.file for shard in layout.shards for name in shard.tensors}
    if set(file_of) != set(specs):
        raise CheckpointError(f"{source}: recorded file split does not match the inventory of its config")
    with staging(dst) as tmp, contextlib.ExitStack() as files:
        writers = {shard.file: files.enter_context(ShardWriter(tmp / shard.file, [specs[n] for n in shard.tensors],
                                                               shard.metadata))
                   for shard in layout.shards}
        bar = files.enter_context(tqdm(total=sum(s.nbytes for s in specs.values()), unit="B", unit_scale=True,
                                       desc=f"export {dst.name}", disable=not progress))
        for batch in byte_batches(units(cfg), lambda unit: sum(sizes.get(n, 0) for n in _leaf_names(unit)),
                                  _LOAD_BYTES):
            values = load([n for unit in batch for n in _leaf_names(unit) if n in sizes])
            for unit in batch:
                try:
                    for name, array in encode(unit, values):
                        at = first_non_finite(array, specs[name].dtype)
                        if at is not None:  # a diverged model: the published files would poison any reader
                            raise CheckpointError(f"tensor {name} {non_finite_message(specs[name].dtype)} at {at}")
                        writers[file_of[name]].write(name, array)
                        bar.update(specs[name].nbytes)
                except CheckpointError as e:
                    raise CheckpointError(f"{source}: {e}") from None
        files.close()  # every file complete before the folder is renamed into place
        (tmp / INDEX).write_text(layout.index_text(specs))
        (tmp / "config.json").write_bytes(config_bytes)
        for path in companions:
            shutil.copyfile(path, tmp / path.name)
    return dst


def _leaf_names(unit: PlainUnit | QuantizedUnit) -> list[str]:
    return [unit.spec.name] if isinstance(unit, PlainUnit) else [unit.name + ".weight", unit.name + ".scale"]
