"""Write a random checkpoint in exactly the published layout for a config.

    python tools/make_checkpoint.py configs/tiny.json /tmp/tiny-ckpt [--seed 0] [--shard-bytes 4e9]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from v4jax.checkpoint import write_random_checkpoint


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="a config.json (copied into the checkpoint byte for byte)")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-bytes", type=float, help="pack layers into files of up to this size "
                                                     "(default: one layer per file, as published)")
    args = p.parse_args(argv)
    shard_bytes = int(args.shard_bytes) if args.shard_bytes else None
    print(write_random_checkpoint(args.config, args.out, seed=args.seed, shard_bytes=shard_bytes))


if __name__ == "__main__":
    main()
