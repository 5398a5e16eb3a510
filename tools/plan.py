"""Per-device memory of Flash / Pro on simulated meshes, and the smallest mesh that holds them.

Parameters are abstract (never allocated); the prefill chunk and the one-token decode
step are compiled for each mesh on simulated CPU devices, so this runs on any machine.

    python tools/plan.py --devices 8 16 64 256          # per-device memory at these device counts
    python tools/plan.py --fit 141 95 --json plan.json  # smallest device count per device size (GB)

Also `v4jax plan`. What is measured and how: sharding/plan.py (`v4jax.sharding.plan`).
"""

import argparse

from v4jax.sharding import plan


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    plan.add_arguments(parser)
    plan.run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
