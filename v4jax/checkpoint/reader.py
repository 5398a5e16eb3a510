"""A published checkpoint folder, validated against the inventory, with lazy windowed reads.

`read_published` checks everything before a caller writes anything: the config,
the index (entries confined to the folder), every file header (sizes, truncation,
overlaps), every tensor's presence, dtype and shape against `v4jax.checkpoint.inventory`, and
the values that conversion relies on (block scales are finite powers of two, the
hash-routing table holds valid expert ids). Tensors are then read through short-lived
memory maps of just the rows asked for, so memory stays bounded by what the caller
keeps and each process touches only the slices it needs.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
from pathlib import Path

import numpy as np

from v4jax.errors import CheckpointError
from v4jax.checkpoint.layout import INDEX, FileLayout, Shard, shard_file_name
from v4jax.checkpoint.safetensors_format import NUMPY_DTYPES, read_header
from v4jax.config import ConfigError, ModelConfig, load_json_file
from v4jax.checkpoint.inventory import TensorSpec, config_keys_of, published_tensors, total_bytes

# Files besides the weights that travel with a checkpoint through conversion and export.
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# Rows are mapped at most this many bytes at a time, so a read never holds more of the file.
_MAP_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class TensorLocation:
    file: Path
    spec: TensorSpec
    offset: int  # absolute file offset of the first byte


@dataclasses.dataclass(frozen=True)
class PublishedCheckpoint:
    path: Path
    cfg: ModelConfig
    layout: FileLayout  # the split found on disk, kept so export can reproduce it
    tensors: dict[str, TensorLocation]

    def read(self, name: str, index: tuple[slice, ...] = (), out: np.ndarray | None = None) -> np.ndarray:
        """tensor[index] (unit-step slices) in its published numpy dtype, copied into `out` if given.

        Only the rows the first slice selects are mapped, a bounded chunk at a time.
        """
        loc = self.tensors[name]
        shape, dtype = loc.spec.shape, NUMPY_DTYPES[loc.spec.dtype]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
        if any(s.step not in (None, 1) for s in index):
            raise ValueError(f"tensor {name}: only unit-step slices can be read")
        window = tuple(max(0, hi - lo) for lo, hi in bounds)
        if out is None:
            out = np.empty(window, dtype)
        if out.size == 0:
            return out
        (r0, r1), rest = bounds[0], tuple(slice(lo, hi) for lo, hi in bounds[1:])
        row = math.prod(shape[1:]) * dtype.itemsize
        step = max(1, _MAP_BYTES // max(row, 1))
        with open(loc.file, "rb") as f:
            for a in range(r0, r1, step):
                b = min(a + step, r1)
                start, length = loc.offset + a * row, (b - a) * row
                base = start - start % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(f.fileno(), start + length - base, offset=base, access=mmap.ACCESS_READ) as m:
                    m.madvise(mmap.MADV_WILLNEED)  # one large read-ahead instead of a fault per page
                    rows = np.frombuffer(m, dtype, count=length // dtype.itemsize, offset=start - base)
                    np.copyto(out[a - r0:b - r0], rows.reshape((b - a,) + shape[1:])[(slice(None),) + rest])
                    del rows  # the map cannot close while a view of it is alive
        return out


def read_published(path: str | Path) -> PublishedCheckpoint:
    """Open and fully validate a published checkpoint folder; raises CheckpointError."""
    root = Path(path).absolute()  # once, here: Orbax and error messages want absolute paths
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a checkpoint folder")
    if not ((root / INDEX).exists() or (root / INDEX).is_symlink()):
        raise CheckpointError(f"{root}: not a published checkpoint folder (no {INDEX})")
    try:
        cfg = ModelConfig.from_json(root / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    expected = {s.name: s for s in published_tensors(cfg)}
    index_path = root / INDEX
    weight_map, index_metadata = _read_index(index_path)
    for name, file in weight_map.items():  # every name checked before any file is opened
        shard_file_name(file, index_path, f"weight_map[{name!r}]")

    for name in weight_map:
        if name not in expected:
            raise CheckpointError(f"{index_path}: unknown tensor {name} (not in the inventory of this config)")
    for name in expected:
        if name not in weight_map:
            raise CheckpointError(f"{index_path}: tensor {name} is missing")
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    tensors, shards = {}, []
    for file, listed in files.items():
        shard_path = _shard_path(root, file, index_path, listed[0])
        header = read_header(shard_path)
        found = {e.spec.name: e for e in header.entries}
        for name in found:
            if weight_map.get(name) != file:
                raise CheckpointError(f"{shard_path}: tensor {name} is not listed for this file in the index")
        for name in listed:
            if name not in found:
                raise CheckpointError(f"{shard_path}: tensor {name} is missing (the index lists it here)")
            got, want = found[name].spec, expected[name]
            if got.dtype != want.dtype:
                raise CheckpointError(f"{shard_path}: tensor {name} has dtype {got.dtype}, expected {want.dtype}")
            if got.shape != want.shape:
                raise CheckpointError(f"{shard_path}: tensor {name} has shape {list(got.shape)}, "
                                      f"expected {list(want.shape)}{_driven_by(cfg, name, got.shape, want.shape)}")
            tensors[name] = TensorLocation(shard_path, got, found[name].offset)
        shards.append(Shard(file, tuple(e.spec.name for e in header.entries), header.metadata))
    # After the shapes: a config that disagrees with the weights is named by its tensor and key above.
    if index_metadata.get("total_size") != total_bytes(list(expected.values())):
        raise CheckpointError(f"{index_path}: metadata.total_size is {index_metadata.get('total_size')!r}, "
                              f"expected {total_bytes(list(expected.values()))}")

    published = PublishedCheckpoint(root, cfg, FileLayout(tuple(shards), tuple(weight_map), index_metadata), tensors)
    _check_values(published)
    return published


def companion_files(folder: Path) -> list[Path]:
    """The companion files `folder` holds, each checked to be a JSON object: a tokenizer.json that
    is not one is refused before a conversion or export copies it, not when a prompt is encoded."""
    present = []
    for path in (folder / name for name in COMPANION_FILES):
        if not (path.exists() or path.is_symlink()):
            continue
        try:
            value = load_json_file(path)
        except (OSError, ValueError) as e:  # ValueError: not a regular file, invalid UTF-8 or JSON, a key twice
            raise CheckpointError(f"{path}: cannot read: {type(e).__name__}: {e}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
        present.append(path)
    return present


def _read_index(index_path: Path) -> tuple[dict[str, str], dict]:
    try:
        index = load_json_file(index_path)
    except (OSError, ValueError) as e:  # ValueError: invalid UTF-8 or JSON, a duplicate key
        raise CheckpointError(f"{index_path}: cannot read the index: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    metadata = index.get("metadata", {}) if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
            and isinstance(metadata, dict)):
        raise CheckpointError(f"{index_path}: expected {{'metadata': {{...}}, 'weight_map': {{name: file}}}}")
    return weight_map, metadata


def _shard_path(root: Path, file: str, index_path: Path, name: str) -> Path:
    """The file a (checked, plain) index entry names inside the folder, followed if it is a symlink."""
    if not (root / file).is_file():
        what = "is not a regular file" if (root / file).exists() else "does not exist"
        raise CheckpointError(f"{index_path}: tensor {name} points to {file!r}, which {what}")
    return root / file


def _driven_by(cfg: ModelConfig, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str:
    """' (axis i follows config key k)' for the first axis where the file and the config disagree."""
    if len(got) != len(want):
        return ""
    axis = next(i for i, (g, w) in enumerate(zip(got, want)) if g != w)
    keys = config_keys_of(cfg, name, axis)
    return f"; its axis {axis} follows config key {' / '.join(map(repr, keys))}" if keys else ""


def _check_values(published: PublishedCheckpoint) -> None:
    """Scales must be finite powers of two (what makes dequantisation exact and export
    lossless); hash-routing tables must hold expert ids < n_routed_experts."""
    n_experts = published.cfg.n_routed_experts
    for name, loc in published.tensors.items():
        if name.endswith(".scale"):
            values = published.read(name)
            if loc.spec.dtype == "F8_E8M0":
                bad = values.view(np.uint8) == 0xFF  # the one E8M0 byte that is NaN
            else:
                mantissa, _ = np.frexp(values)
                bad = ~np.isfinite(values) | (mantissa != 0.5)
            if bad.any():
                at = tuple(int(i) for i in np.argwhere(bad)[0])
                raise CheckpointError(f"{loc.file}: tensor {name} has scale {values[at]} at {list(at)}; "
                                      "scales must be finite powers of two")
        elif name.endswith(".tid2eid"):
            ids = published.read(name)
            if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
                raise CheckpointError(f"{loc.file}: tensor {name} holds expert ids outside 0..{n_experts - 1}")
