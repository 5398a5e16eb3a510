"""`v4jax plan`: per-device memory of Flash / Pro on simulated meshes (`--fit`: the smallest mesh
per device size). What is measured and how: `v4jax.memory_plan`."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
from pathlib import Path

from v4jax.cli.common import CONFIGS, existing_file, int_at_least, new_file, nonnegative_int, positive_float

CONTEXTS = ("128K", "1M")  # the serving plans' default contexts
UNITS = {"K": 1024, "M": 1048576}
# Bounds that keep a plan's arithmetic and simulated meshes finite (4x V4's 1M context; 16
# times the README's largest mesh): past them XLA's shape arithmetic overflows or the
# simulated devices take minutes to create.
MAX_TOKENS = 4 * 1048576
MAX_BATCH = 4096
MAX_DEVICES = 4096
token_count = int_at_least(1, MAX_TOKENS)
device_count = int_at_least(1, MAX_DEVICES)


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="per-device memory of Flash / Pro on simulated meshes",
                       description="Lower prefill and decode with abstract parameters on simulated CPU meshes "
                                   "and print per-device parameter, cache and temporary memory (--fit: the "
                                   "smallest mesh per device size).")
    p.add_argument("--models", nargs="+", type=model_config, default=[model_config("flash"), model_config("pro")],
                   help="a packaged config (flash, pro, flash-base, pro-base, tiny) or a config.json path")
    p.add_argument("--weights", nargs="+", default=["quantized", "bfloat16"], choices=["quantized", "bfloat16"],
                   help="kept FP8/FP4 codes + scales, or dequantised to bf16")
    p.add_argument("--contexts", nargs="+", type=context, default=[context(c) for c in CONTEXTS],
                   help="token counts, plain or with K / M (e.g. 128K 1M 65536)")
    p.add_argument("--devices", nargs="+", type=device_count, default=[8, 16, 64, 256], help="device counts (table mode)")
    p.add_argument("--fit", nargs="+", type=positive_float, metavar="GB",
                   help="device memory sizes in GB (1e9): find the smallest fitting device count instead")
    p.add_argument("--fit-sizes", nargs="+", type=device_count, default=[1, 2, 4, 8, 16, 32, 64, 128, 256],
                   help="device counts --fit tries")
    p.add_argument("--batch", type=int_at_least(1, MAX_BATCH), default=1)
    p.add_argument("--chunk", type=token_count, default=4096, help="prefill chunk (tokens)")
    p.add_argument("--temp-reps", type=nonnegative_int, default=1,
                   help="compile temporaries on a copy with at most this many layers per scan segment "
                        "(default 1, as the README's tables; 0: the full depth, slow); LoRA rows extrapolate "
                        "the full depth from it and one more")
    p.add_argument("--lora-rank", type=int_at_least(1, 4096),
                   help="plan LoRA fine-tuning of this rank instead (quantised base, training rules, one "
                        "sequence per data-parallel replica, remat): base, adapters + AdamW and the compiled "
                        "step's temporaries")
    p.add_argument("--lora-tokens", nargs="+", type=context, default=[context("8K"), context("64K")],
                   help="tokens per sequence of the LoRA rows")
    p.add_argument("--lora-tensor", nargs="+", type=device_count, default=[1], metavar="T",
                   help="tensor-parallel degrees of the LoRA rows: T devices share one sequence, splitting its heads, "
                        "FFN widths, vocabulary and residual stream (a 64K-token sequence of Flash needs 8)")
    p.add_argument("--json", type=new_file, help="also write the plans here")
    p.set_defaults(run=run)
    return p


def model_config(value: str) -> Path:
    if value.endswith(".json"):
        return existing_file(value)
    path = Path(str(CONFIGS / f"{value}.json"))
    if not path.is_file():
        names = sorted(p.name.removesuffix(".json") for p in CONFIGS.iterdir() if p.name.endswith(".json"))
        raise argparse.ArgumentTypeError(f"{value!r} is not a packaged config ({', '.join(names)}) nor a .json path")
    return path


def context(value: str) -> tuple[str, int]:
    """A token count, plain or with a K (1,024) or M (1,048,576) suffix ("8K", "128K", "1M") -> (label, tokens)."""
    scale = UNITS.get(value[-1:])
    if scale is None or not value[:-1].isdigit():
        return value, token_count(value)
    tokens = int(value[:-1]) * scale
    if not 1 <= tokens <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_TOKENS} tokens (4M), got {value!r}")
    return value, tokens


def simulate_devices(n: int) -> None:
    """Ask for n simulated CPU devices (before JAX starts its backend) and turn off XLA:CPU's
    loop-invariant code motion, which hoists whole-stack dtype conversions out of the layer
    loop: a CPU-only temporary that would otherwise dominate the plan."""
    from v4jax.sharding import simulate_cpu_devices

    simulate_cpu_devices(n)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_disable_hlo_passes=while-loop-invariant-code-motion")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def run(args: argparse.Namespace):
    """Print the table of plans (or, with --fit, the smallest fitting meshes); returns the plans."""
    from v4jax.config import ModelConfig
    from v4jax.memory_plan import (
        abstract_model,
        best_mesh,
        format_fits,
        format_plans,
        plan_memory,
        smallest_fit,
        to_json,
    )

    def row(plan) -> None:
        print(format_plans([plan]).splitlines()[-1], flush=True)

    simulate_devices(max(args.fit_sizes if args.fit else args.devices))
    temp_reps = args.temp_reps or None
    if args.lora_rank:
        return _run_lora(args, temp_reps)
    plans, fits = [], []
    for path in args.models:
        for weights in args.weights:
            cfg = ModelConfig.from_json(path, quantized=weights == "quantized")
            for label, tokens in args.contexts:
                common = dict(model=path.stem, batch=args.batch, context=tokens, chunk=args.chunk, temp_reps=temp_reps)
                if args.fit:
                    found = smallest_fit(cfg, [gb * 1e9 for gb in args.fit], args.fit_sizes, **common, on_plan=row)
                    fits.append((path.stem, weights, label, found))
                    plans += [p for p in dict.fromkeys(found.values()) if p is not None]
                    continue
                abstract = abstract_model(cfg)
                for n in args.devices:
                    best = best_mesh(abstract, n, "inference", args.batch, tokens)
                    if best is None:
                        print(f"| {path.stem} | {weights} | {label} | {n} | no mesh the rules accept |", flush=True)
                        continue
                    plans.append(plan_memory(cfg, best[0], **common))
                    row(plans[-1])
    print()
    print(format_plans(plans))
    if args.fit:
        print()
        print(format_fits(fits, args.fit))
    if args.json:
        args.json.write_text(to_json(plans))
    return plans


def _run_lora(args: argparse.Namespace, temp_reps):
    """The LoRA rows: per model and tokens per sequence, each --devices count (or, with --fit, the
    smallest --fit-sizes count per device size)."""
    from v4jax.config import ModelConfig
    from v4jax.memory_plan import format_lora_plans, plan_lora, smallest_lora_fit

    plans = []
    for path in args.models:
        cfg = ModelConfig.from_json(path, quantized=True)
        for (label, tokens), tensor in itertools.product(args.lora_tokens, args.lora_tensor):
            common = dict(model=path.stem, tensor=tensor, temp_reps=temp_reps)
            if args.fit:
                for gb in args.fit:
                    plan = smallest_lora_fit(cfg, gb * 1e9, args.fit_sizes, args.lora_rank, tokens, **common)
                    print(f"| {path.stem} | {label} | tensor={tensor} | {gb:g} GB devices | "
                          f"{'none of the sizes tried' if plan is None else plan.devices} |", flush=True)
                    plans += [plan] if plan is not None else []
                continue
            for n in args.devices:
                plan = plan_lora(cfg, n, args.lora_rank, tokens, **common)
                if plan is None:
                    print(f"| {path.stem} | {label} | {n} | no mesh the training rules accept with tensor={tensor} |",
                          flush=True)
                    continue
                plans.append(plan)
                print(format_lora_plans([plan]).splitlines()[-1], flush=True)
    print()
    print(format_lora_plans(plans))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(p) | {"peak": p.peak} for p in plans], indent=1))
    return plans
