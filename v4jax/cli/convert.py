"""`v4jax convert SRC DST`: a published FP8/FP4 safetensors folder -> an Orbax checkpoint."""

from __future__ import annotations

import argparse

from v4jax.cli.common import existing_dir, mesh_of, new_dir


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="published FP8/FP4 safetensors folder -> Orbax checkpoint",
                       description="Validate a published checkpoint folder and convert it to an Orbax "
                                   "checkpoint of the model layout (atomically: DST appears only when complete).")
    p.add_argument("src", type=existing_dir, help="published checkpoint folder (config.json, index, safetensors shards)")
    p.add_argument("dst", type=new_dir, help="output folder (must not exist)")
    p.add_argument("--mesh", help='place leaves on this mesh while converting, e.g. "expert=4,tensor=2"')
    p.add_argument("--keep-quantized", action="store_true", help="keep FP8/FP4 codes + float32 scales")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of dequantised weights and BF16 tensors (default bfloat16)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from flax import nnx

    from v4jax.checkpoint import convert
    from v4jax.config import ModelConfig
    from v4jax.checkpoint.loading import checkpoint_shardings
    from v4jax.model import Transformer

    mesh = mesh_of(args.mesh)
    sharding_for = None
    if mesh is not None:  # by the inference rules of the model the checkpoint holds
        cfg = ModelConfig.from_json(args.src / "config.json", dtype=args.dtype, quantized=args.keep_quantized)
        sharding_for = checkpoint_shardings(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), mesh)
    convert(args.src, args.dst, keep_quantized=args.keep_quantized, dtype=args.dtype, sharding_for=sharding_for)
