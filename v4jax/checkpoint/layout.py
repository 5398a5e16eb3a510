"""How a checkpoint's tensors are split into files: index order, files, each file's data order.

The published split (spec §3.1) puts the embedding alone in the first file, one
layer per file after it, `hc_head_*`, `norm` and `head` in the second-to-last and
the whole MTP block in the last. A converted checkpoint records the split it was
read from, so that export writes the very same files back.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

from v4jax.checkpoint.inventory import TensorSpec, published_tensors
from v4jax.checkpoint.safetensors_format import data_order
from v4jax.config import ModelConfig, load_json_file
from v4jax.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SUFFIX = ".safetensors"


def shard_file_name(value: object, source: Path | str, key: str) -> str:
    """A weights file name read from `source` (an index entry, a recorded layout): a plain
    `*.safetensors` name inside its folder, never a path that could lead out of it.
    (A plain name that is a symlink is followed: a Hugging Face cache snapshot is made of them.)"""
    if not (isinstance(value, str) and value.endswith(SUFFIX) and len(value) > len(SUFFIX)
            and value not in (".", "..") and not any(c in value for c in "/\\\0:")
            and value == value.strip()):
        raise CheckpointError(f"{source}: {key} names {value!r}; expected a plain file name "
                              f"ending in {SUFFIX} inside the folder (no path separators, '..' or NUL)")
    return value


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str
    tensors: tuple[str, ...]  # in data order
    metadata: dict[str, str] | None = None  # the header's __metadata__


@dataclasses.dataclass(frozen=True)
class FileLayout:
    shards: tuple[Shard, ...]
    order: tuple[str, ...]  # weight_map order of the index
    index_metadata: dict  # the index's "metadata" object; total_size is recomputed on write

    @classmethod
    def published(cls, cfg: ModelConfig, shard_bytes: int | None = None) -> "FileLayout":
        """The published split for `cfg`; `shard_bytes` packs consecutive layers into one
        file up to that size (None: one layer per file, as published)."""
        specs = published_tensors(cfg)
        groups = [list(g) for _, g in itertools.groupby(specs, key=lambda s: _group(s.name))]
        files, current = [groups[0]], []  # the embedding alone first
        for group in groups[1:]:
            if not _group(group[0].name).startswith("layers."):
                files, current = files + ([current] if current else []) + [group], []
                continue
            size = sum(s.nbytes for s in current + group)
            if current and (shard_bytes is None or size > shard_bytes):
                files.append(current)
                current = []
            current = current + group
        n = len(files)
        shards = tuple(Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(s.name for s in data_order(f)))
                       for i, f in enumerate(files))
        return cls(shards, tuple(s.name for s in specs), {})

    def index_text(self, specs: dict[str, TensorSpec]) -> str:
        """The `model.safetensors.index.json` text, formatted as published."""
        file_of = {name: shard.file for shard in self.shards for name in shard.tensors}
        metadata = {**self.index_metadata, "total_size": sum(specs[n].nbytes for n in self.order)}
        return json.dumps({"metadata": metadata, "weight_map": {n: file_of[n] for n in self.order}}, indent=2)

    def to_json(self) -> str:
        return json.dumps({"shards": [dataclasses.asdict(s) for s in self.shards], "order": self.order,
                           "index_metadata": self.index_metadata})

    @classmethod
    def from_json(cls, path: Path) -> "FileLayout":
        """The layout a converted folder recorded (`path`: its layout.json), checked as strictly
        as a published index: plain distinct file names, each tensor in one file and in `order`."""
        try:
            raw = load_json_file(path)
            shards = tuple(Shard(shard_file_name(s["file"], path, f"shards[{i}].file"), _names(s["tensors"]),
                                 _string_map(s["metadata"])) for i, s in enumerate(raw["shards"]))
            layout = cls(shards, _names(raw["order"]), raw["index_metadata"])
        except CheckpointError:
            raise
        except (OSError, KeyError, TypeError, ValueError) as e:  # ValueError: bad UTF-8 / JSON, duplicate key
            raise CheckpointError(f"{path}: not a valid recorded file split ({type(e).__name__}: {e})") from None
        if not isinstance(layout.index_metadata, dict):
            raise CheckpointError(f"{path}: index_metadata must be an object")
        layout.check(path)
        return layout

    def check(self, source: Path | str) -> None:
        """Distinct file names; every tensor in exactly one file and once in the index order."""
        files = [s.file for s in self.shards]
        if len(set(files)) != len(files):
            raise CheckpointError(f"{source}: file {next(f for f in files if files.count(f) > 1)!r} is listed twice")
        placed = [n for s in self.shards for n in s.tensors]
        if sorted(placed) != sorted(self.order) or len(set(placed)) != len(placed):
            raise CheckpointError(f"{source}: the files' tensors and the index order list different tensors")


def _names(value: object) -> tuple[str, ...]:
    if not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
        raise TypeError("expected a list of tensor names")
    return tuple(value)


def _string_map(value: object) -> dict[str, str] | None:
    if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
        raise TypeError("a file's metadata must map strings to strings")
    return value


def config_text(cfg: ModelConfig) -> str:
    """`config.json` for a config that comes without its published file."""
    return json.dumps(cfg.to_dict(), indent=2)


def _group(name: str) -> str:
    """Which part of the model a tensor belongs to: embed, layers.{i}, head or mtp.0."""
    if name.startswith(("layers.", "mtp.")):
        return ".".join(name.split(".")[:2])
    return "embed" if name == "embed.weight" else "head"
