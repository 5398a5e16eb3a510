"""`v4jax export SRC DST`: a converted Orbax checkpoint -> the published safetensors layout."""

from __future__ import annotations

import argparse

from v4jax.cli.common import existing_dir, export_source, new_dir


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="converted Orbax checkpoint -> published safetensors folder",
                       description="Write a converted checkpoint back in the published layout (same names, "
                                   "dtypes, file split and index; an unmodified one comes back byte for byte).")
    p.add_argument("src", type=existing_dir, help="converted checkpoint folder or `v4jax train` run folder")
    p.add_argument("dst", type=new_dir, help="output folder (must not exist)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from v4jax.checkpoint import converted_config, export

    source, cfg = export_source(args.src)  # a training run: its latest step, re-encoded
    if cfg is None:
        converted_config(args.src)  # "not a converted v4jax checkpoint" before anything is written
    export(source, args.dst, cfg=cfg)
