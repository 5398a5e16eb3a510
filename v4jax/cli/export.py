"""`v4jax export SRC DST`: a converted Orbax checkpoint or a training run -> the published safetensors layout."""

from __future__ import annotations

import argparse

from v4jax.cli.common import existing_dir, export_source, new_dir


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="converted Orbax checkpoint or training run -> published safetensors folder",
                       description="Write a converted checkpoint back in the published layout (same names, "
                                   "dtypes, file split and index; an unmodified one comes back byte for byte). "
                                   "A `v4jax train` run folder gives its latest step, re-encoded, with its base's "
                                   "tokenizer and generation-config files.")
    p.add_argument("src", type=existing_dir, help="converted checkpoint folder or `v4jax train` run folder")
    p.add_argument("dst", type=new_dir, help="output folder (must not exist)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from v4jax.checkpoint import converted_config, export
    from v4jax.checkpoint.reader import companion_files

    source, cfg = export_source(args.src)  # a training run: its latest step, re-encoded
    if cfg is None:
        converted_config(args.src)  # "not a converted v4jax checkpoint" before anything is written
        export(source, args.dst)  # with the folder's companion files
        return
    # the run's copies of its base's files, each checked before anything is written
    export(source, args.dst, cfg=cfg, companions=companion_files(args.src))
