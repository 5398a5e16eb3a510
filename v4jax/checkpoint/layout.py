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

from v4jax.checkpoint.safetensors_format import data_order
from v4jax.config import ModelConfig
from v4jax.checkpoint.inventory import TensorSpec, published_tensors

INDEX = "model.safetensors.index.json"


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
    def from_json(cls, text: str) -> "FileLayout":
        raw = json.loads(text)
        shards = tuple(Shard(s["file"], tuple(s["tensors"]), s["metadata"]) for s in raw["shards"])
        return cls(shards, tuple(raw["order"]), raw["index_metadata"])


def config_text(cfg: ModelConfig) -> str:
    """`config.json` for a config that comes without its published file."""
    return json.dumps(cfg.to_dict(), indent=2)


def _group(name: str) -> str:
    """Which part of the model a tensor belongs to: embed, layers.{i}, head or mtp.0."""
    if name.startswith(("layers.", "mtp.")):
        return ".".join(name.split(".")[:2])
    return "embed" if name == "embed.weight" else "head"
