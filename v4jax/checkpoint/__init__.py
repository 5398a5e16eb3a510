"""Checkpoint conversion: published FP8/FP4 safetensors <-> Orbax checkpoints of the model layout.

    published = read_published("DeepSeek-V4-Flash")        # validated, lazy
    convert("DeepSeek-V4-Flash", "flash-orbax", sharding_for=...)
    flat = load_flat("flash-orbax", abstract)               # onto any sharding
    export("flash-orbax", "DeepSeek-V4-Flash-again")        # byte for byte
    write_random_checkpoint(cfg, "/tmp/tiny")               # published layout, random weights
"""

from v4jax.checkpoint.converter import convert, converted_config, iter_flat, iter_model_layout, load_flat
from v4jax.errors import CheckpointError
from v4jax.checkpoint.exporter import export
from v4jax.checkpoint.model_layout import model_layout
from v4jax.checkpoint.random import write_random_checkpoint
from v4jax.checkpoint.reader import PublishedCheckpoint, read_published

__all__ = [
    "CheckpointError", "PublishedCheckpoint", "convert", "converted_config", "export", "iter_flat", "iter_model_layout",
    "load_flat", "model_layout", "read_published", "write_random_checkpoint",
]
