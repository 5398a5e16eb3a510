"""`v4jax train`: next-token (+ MTP) fine-tuning with Orbax save/resume. The data is read, checked
and packed (at least one batch) before the model loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from v4jax.cli.common import (
    UsageError,
    add_model_options,
    check_batch,
    checkpoint_config,
    dir_to_use,
    existing_dir,
    existing_file,
    int_at_least,
    load_model,
    mesh_of,
    nonnegative_float,
    nonnegative_int,
    position_limit,
    positive_float,
    positive_int,
)
from v4jax.cli.merge import add_adapters, add_lora_options


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune on a JSON Lines data set, with Orbax save/resume",
                       description="Next-token (+ MTP) fine-tuning with AdamW, or V4's Muon/AdamW split, over the "
                                   "model parameters (linear warm-up, cosine decay to 0.1x over --steps); "
                                   "checkpoints go to OUT and a rerun resumes from the latest one.")
    p.add_argument("--ckpt", required=True, type=existing_dir, help="published or converted checkpoint folder")
    p.add_argument("--data", required=True, type=existing_file, help="JSON Lines file with 'ids' or 'text' records")
    p.add_argument("--out", required=True, type=dir_to_use, help="folder for training checkpoints")
    p.add_argument("--steps", type=positive_int, default=100)
    p.add_argument("--seq-len", type=int_at_least(2), default=512)
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                   help="adamw (every parameter) or muon (V4's split: Muon for matrices, AdamW for embedding, "
                        "head, norms, mHC biases and scales)")
    p.add_argument("--warmup", type=nonnegative_int, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.1, help="decoupled, on matrices only")
    p.add_argument("--clip", type=positive_float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--mtp-weight", type=nonnegative_float, default=0.3, help="weight of the MTP loss (0: off)")
    p.add_argument("--bias-update-rate", type=nonnegative_float, default=0.0,
                   help="aux-loss-free router-bias speed after each step (V4 pre-training: 0.001; default 0: "
                        "biases frozen, as the training spec recommends for fine-tuning)")
    p.add_argument("--balance-weight", type=nonnegative_float, default=0.0,
                   help="weight of the sequence-wise balance loss (V4 pre-training: 0.0001; default 0: off)")
    p.add_argument("--save-every", type=positive_int, default=50)
    p.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    p.add_argument("--mesh", help='e.g. "fsdp=4,expert=2" (default: one device)')
    add_model_options(p)
    add_lora_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from v4jax import data, train
    from v4jax.optim import OptimizerConfig

    if args.out.is_dir() and any(args.out.iterdir()) and not _has_steps(args.out):
        raise UsageError(f"--out {args.out}: not empty and holds no training checkpoints; refusing to write into it")
    cfg = checkpoint_config(args.ckpt)
    limit = position_limit(args.ckpt)
    if limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the checkpoint's max_position_embeddings {limit}")
    documents = data.documents(args.data, data.load_tokenizer(args.ckpt), vocab_size=cfg.vocab_size)
    train.packed_batches(documents, args.seq_len, args.batch)  # "fewer than one batch" before the model loads
    mesh = mesh_of(args.mesh)
    check_batch(mesh, "training", args.batch, "--batch")

    model, on_mesh = load_model(args.ckpt, mesh, rules="training", remat=args.remat, dtype=args.dtype,
                                quant_sim=args.quant_sim)
    wrt = add_adapters(model, args, mesh)  # --lora-rank: only the adapters train and are saved
    with on_mesh:  # the optimizer's moments follow their parameters, its step count lands on the mesh
        opt = train.make_optimizer(model, OptimizerConfig(
            name=args.optimizer, learning_rate=args.lr, warmup_steps=args.warmup, total_steps=args.steps,
            weight_decay=args.weight_decay, clip_norm=args.clip), wrt=wrt)
        checkpoints = train.Checkpoints(args.out, wrt=wrt)
        step = checkpoints.restore(model, opt) if checkpoints.latest_step() is not None else 0
        if step >= args.steps:
            print(f"{args.out}: already at step {step} (--steps {args.steps}); nothing to do", file=sys.stderr)
        batches = train.packed_batches(documents, args.seq_len, args.batch, seed=step)
        while step < args.steps:
            ids, mask = next(batches)
            metrics = train.train_step(model, opt, ids, mask, mtp_weight=args.mtp_weight,
                                       balance_weight=args.balance_weight, bias_update_rate=args.bias_update_rate,
                                       wrt=wrt)
            step += 1
            print(f"step {step}: " + " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()), flush=True)
            if step % args.save_every == 0 or step == args.steps:
                checkpoints.save(step, model, opt)


def _has_steps(folder: Path) -> bool:
    """Whether a folder holds Orbax step folders ("12", or the temporary "12.orbax-checkpoint-tmp-...")."""
    return any(p.is_dir() and p.name.split(".")[0].isdigit() for p in folder.iterdir())
