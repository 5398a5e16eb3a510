"""`v4jax merge --base DIR --adapter RUN [--peft] OUT`: fold a LoRA run's adapters into its base and
write a converted checkpoint (or write them in the PEFT layout); also the `--lora-*` options
`v4jax train` takes and the run's `lora.json` (v4jax.lora_export)."""

from __future__ import annotations

import argparse
import json
import sys

from v4jax.cli.common import UsageError, existing_dir, new_dir, nonnegative_float, positive_float, positive_int


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("merge", help="fold a LoRA run's adapters into its base checkpoint",
                       description="Load the base, restore the latest adapters of a `v4jax train --lora-rank` "
                                   "run, fold them in (float32) and write a converted checkpoint (float32, "
                                   "dequantised). The adapted FP8/FP4 weights get fresh scales, which "
                                   "`v4jax export` encodes with; their re-encoding error is printed per tensor kind.")
    p.add_argument("--base", required=True, type=existing_dir,
                   help="the run's base: published, or converted with its FP8/FP4 codes kept")
    p.add_argument("--adapter", required=True, type=existing_dir, help="the LoRA training run folder")
    p.add_argument("--peft", action="store_true",
                   help="instead of merging, write the adapters in the PEFT layout (adapter_model.safetensors + "
                        "adapter_config.json) for HF transformers' DeepSeek-V4 port")
    p.add_argument("out", type=new_dir, help="output folder (must not exist)")
    p.set_defaults(run=run)
    return p


def add_lora_options(p: argparse.ArgumentParser) -> None:
    """`v4jax train`'s LoRA options (read by `add_adapters`)."""
    from v4jax.lora import DEFAULT_TARGETS

    p.add_argument("--lora-rank", type=positive_int,
                   help="train only LoRA adapters of this rank; the base stays frozen (and quantised if loaded so)")
    p.add_argument("--lora-alpha", type=positive_float, help="LoRA alpha (scale alpha / rank; default: rank)")
    p.add_argument("--lora-targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated module-path endings, each part an fnmatch pattern "
                        "(default: the attention projections and the shared and routed experts; add "
                        "'indexer.*' for the indexer, 'gate' for the router)")
    p.add_argument("--lora-dropout", type=dropout_rate, default=0.0,
                   help="dropout on the adapters' input in training (PEFT's lora_dropout; the dense projections' "
                        "adapters only: the experts', wo_a's and the gate's are folded into their weights)")


def dropout_rate(value: str) -> float:
    rate = nonnegative_float(value)
    if rate >= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1), got {value!r}")
    return rate


def add_adapters(model, args: argparse.Namespace, mesh):
    """With --lora-rank: give the model its adapters (recorded in OUT/lora.json, or checked against
    it on resume) and return nnx.LoRAParam, the leaves to train and save; else nnx.Param."""
    from flax import nnx
    import jax

    from v4jax import lora
    from v4jax.lora_export import LORA_JSON, read_run, run_record
    from v4jax.sharding import shard_model

    if args.lora_rank is None:
        return nnx.Param
    cfg = lora.LoRAConfig(args.lora_rank, args.lora_alpha, tuple(t for t in args.lora_targets.split(",") if t),
                          args.lora_dropout)
    record = run_record(cfg, args.optimizer, model.cfg.dtype)
    recorded = read_run(args.out)
    if recorded is not None and recorded != record:
        raise UsageError(f"--out {args.out}: its {LORA_JSON} records {json.dumps(recorded)}, "
                         f"not these options {json.dumps(record)}")
    lora.apply_lora(model, cfg, jax.random.key(0))
    if mesh is not None:
        shard_model(model, mesh, "training")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / LORA_JSON).write_text(json.dumps(record))
    return nnx.LoRAParam


def run(args: argparse.Namespace) -> None:
    import numpy as np

    from v4jax import load_pretrained, lora_export
    from v4jax.checkpoint import converted_config, read_published
    from v4jax.checkpoint.converter import LAYOUT

    record = lora_export.read_run(args.adapter)
    if record is None:
        raise UsageError(f"--adapter {args.adapter}: no {lora_export.LORA_JSON} (not a `v4jax train --lora-rank` run)")
    published = (args.base / "model.safetensors.index.json").is_file()
    if not published and not converted_config(args.base).quantized:
        raise UsageError(f"--base {args.base}: converted without its FP8/FP4 codes; merge needs them "
                         f"(the published folder, or one converted with --keep-quantized)")
    # The adapters' dtype as trained (a restore checks their bytes); the merge itself runs in float32.
    model = load_pretrained(args.base, dtype=record["dtype"], quantized=True)
    step = lora_export.restore_adapters(model, args.adapter)
    if args.peft:
        lora_export.write_peft(model, args.out)
        print(f"{args.out}: PEFT adapters of {args.adapter} step {step}", file=sys.stderr)
        return
    merged, adapted = lora_export.merged_flat(model)
    flat = {name: np.asarray(v) for name, v in merged.items()}
    stored = lora_export.model_layout(model.cfg.replace(dtype="float32"), keep_quantized=False)
    flat |= lora_export.base_leaves(args.base, model.cfg, set(stored) - set(flat))
    errors = lora_export.fresh_scales(flat, adapted)
    layout = read_published(args.base).layout.to_json() if published else (args.base / LAYOUT).read_text()
    lora_export.write_converted(flat, model.cfg, layout, args.base, args.out)
    print(f"{args.out}: base {args.base} + adapters of {args.adapter} step {step}", file=sys.stderr)
    for kind, err in sorted(errors.items()):
        print(f"re-encoding error {kind}: {err:.3e} (relative, fresh scales)")
