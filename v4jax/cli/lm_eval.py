"""`v4jax lm-eval --ckpt DIR --tasks ... [lm-eval options]`: lm-evaluation-harness with the `v4jax`
model (`pip install v4jax[lm-eval]`). The options v4jax does not know go to lm-eval's own
`run` parser unchanged (--tasks, --num_fewshot, --include_path, --log_samples, --output_path,
--gen_kwargs ...), so they mean what lm-eval's documentation says."""

from __future__ import annotations

import argparse
import json

from v4jax.cli.common import UsageError, add_model_options, existing_dir, positive_int


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness tasks on a checkpoint",
                       description="Every option not listed here is passed to `lm-eval run` (see lm-eval run "
                                   "--help), with --model v4jax and --model_args built from these.")
    p.add_argument("--ckpt", required=True, type=existing_dir,
                   help="published or converted checkpoint folder, or a `v4jax train` run folder (its latest step)")
    p.add_argument("--max-length", type=positive_int,
                   help="tokens a request may hold (default: the checkpoint's max_position_embeddings, as HFLM)")
    p.add_argument("--mesh", help='e.g. "data=8" (default: one device)')
    add_model_options(p)
    p.set_defaults(run=run, passthrough=True)
    return p


def run(args: argparse.Namespace) -> None:
    try:
        from lm_eval._cli import HarnessCLI
    except ImportError:
        raise UsageError("lm-eval is not installed: pip install 'v4jax[lm-eval]'") from None
    import v4jax.harness  # noqa: F401 (registers the model "v4jax")

    if any(a == "--model" or a.startswith("--model=") or a.startswith("--model_args") for a in args.rest):
        raise UsageError("--model and --model_args are v4jax's: give --ckpt, --dtype, --no-quant-sim, --moe-impl, "
                         "--mesh")
    model_args = {"ckpt": str(args.ckpt), "quant_sim": args.quant_sim}
    for key in ("dtype", "mesh", "max_length", "moe_impl"):
        if getattr(args, key) is not None:
            model_args[key] = getattr(args, key)
    harness = HarnessCLI()
    # JSON model_args: a path or a mesh spec may hold the commas of lm-eval's key=value form
    ns = harness._parser.parse_args(["run", "--model", "v4jax", "--model_args", json.dumps(model_args), *args.rest])
    harness.execute(ns)
