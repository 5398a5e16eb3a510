"""`v4jax train`: next-token (+ MTP) fine-tuning into a run folder that a rerun resumes.

The run folder OUT holds the Orbax steps (model, optimiser, and the data loader's position
with each), `run.json` (the base checkpoint it started from), the base's config.json and
tokenizer files (so `--ckpt OUT` works wherever a checkpoint folder is accepted), and
`metrics.jsonl`, one JSON object per step (with `expert_load_max` / `expert_load_min`: per MoE
layer, hash-routed ones included, then the MTP block, the busiest / idlest expert's load over
the mean; `max_expert_load` the largest of the first). The data is read, checked and packed (at least
one batch) before the model loads.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
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

METRICS = "metrics.jsonl"


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune on a JSON Lines data set into a run folder a rerun resumes",
                       description="Next-token (+ MTP) fine-tuning with AdamW, or V4's Muon/AdamW split, over the "
                                   "model parameters (linear warm-up, cosine decay to 0.1x over --steps). "
                                   "Documents are packed into rows at multiples of 128 tokens, each attending "
                                   "within itself. Checkpoints and metrics.jsonl go to OUT; rerunning the same "
                                   "command resumes from the latest checkpoint.")
    p.add_argument("--ckpt", required=True, type=existing_dir, help="published or converted checkpoint folder")
    p.add_argument("--data", required=True, type=existing_file,
                   help="JSON Lines file with 'ids', 'text' or 'prompt' + 'completion' records")
    p.add_argument("--out", required=True, type=dir_to_use, help="run folder (created, or resumed)")
    p.add_argument("--steps", type=positive_int, default=100, help="optimiser steps of the whole run")
    p.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per row (a multiple of 128 above 128)")
    p.add_argument("--batch", type=positive_int, default=8, help="rows per optimiser step")
    p.add_argument("--grad-accum", type=positive_int, default=1,
                   help="micro-batches the --batch rows are split into (gradients summed in one compiled step)")
    p.add_argument("--lr", type=positive_float, default=1e-5, help="peak learning rate")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                   help="adamw (every parameter) or muon (V4's split: Muon for matrices, AdamW for embedding, "
                        "head, norms, mHC biases and scales)")
    p.add_argument("--warmup", type=nonnegative_int, default=0, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=nonnegative_float, default=0.1, help="decoupled, on matrices only")
    p.add_argument("--clip", type=positive_float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--mtp-weight", type=nonnegative_float, default=0.3, help="weight of the MTP loss (0: off)")
    p.add_argument("--indexer-loss", choices=("off", "dense", "sparse"), default="off",
                   help="lightning-indexer KL to the head-summed main attention: dense (warm-up over every causal "
                        "compressed entry; only the indexer trains) or sparse (on the selected top-k, the "
                        "indexer's input detached)")
    p.add_argument("--indexer-weight", type=nonnegative_float, default=1.0,
                   help="weight of the indexer loss (the indexer learns from it alone, so it scales its step)")
    p.add_argument("--bias-update-rate", type=nonnegative_float, default=0.0,
                   help="aux-loss-free router-bias speed after each step (V4 pre-training: 0.001; default 0: "
                        "biases frozen, as the training spec recommends for fine-tuning)")
    p.add_argument("--balance-weight", type=nonnegative_float, default=0.0,
                   help="weight of the sequence-wise balance loss (V4 pre-training: 0.0001; default 0: off)")
    p.add_argument("--save-every", type=positive_int, default=50, help="checkpoint every N steps (and at the end)")
    p.add_argument("--keep", type=positive_int, default=3, help="checkpoints kept (the latest ones)")
    p.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0, help="data order (and LoRA dropout masks)")
    p.add_argument("--peak-tflops", type=positive_float,
                   help="the devices' peak TFLOP/s, summed over the mesh (for the mfu metric; without it mfu is null)")
    p.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    p.add_argument("--mesh", help='e.g. "fsdp=4,expert=2" (default: one device)')
    add_model_options(p)
    add_lora_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    import jax
    from tqdm import tqdm

    from v4jax import data, train
    from v4jax.generate import stop_tokens_of
    from v4jax.indexer_loss import indexer_params
    from v4jax.optim import OptimizerConfig, schedule

    if args.indexer_loss == "dense" and args.lora_rank is not None:
        raise UsageError("--indexer-loss dense trains the indexer alone: it does not combine with --lora-rank")
    started = (args.out / train.RUN_INFO).is_file()
    if args.out.is_dir() and any(args.out.iterdir()) and not started:
        raise UsageError(f"--out {args.out}: not empty and holds no training checkpoints; refusing to write into it")
    if started:
        _check_same_base(args.out, args.ckpt)
    cfg = checkpoint_config(args.ckpt)
    limit = position_limit(args.ckpt)
    if limit is not None and args.seq_len > limit:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the checkpoint's max_position_embeddings {limit}")
    if args.seq_len > data.ALIGN and args.seq_len % data.ALIGN:
        raise UsageError(f"--seq-len {args.seq_len}: above {data.ALIGN} it must be a multiple of {data.ALIGN} "
                         "(documents start at multiples of it)")
    if args.batch % args.grad_accum:
        raise UsageError(f"--batch {args.batch} does not split into --grad-accum {args.grad_accum} micro-batches")
    eos = stop_tokens_of(args.ckpt)  # a checkpoint that names none: documents end at their segment boundary only
    examples = data.training_examples(args.data, data.load_tokenizer(args.ckpt), eos[0] if eos else None,
                                      vocab_size=cfg.vocab_size)
    rows = data.pack_rows(examples, args.seq_len)
    batches = data.training_batches(rows, args.batch, args.seed)  # "fewer than one batch" before the model loads
    mesh = mesh_of(args.mesh)
    check_batch(mesh, "training", args.batch // args.grad_accum, "--batch / --grad-accum")

    model, on_mesh = load_model(args.ckpt, mesh, rules="training", remat=args.remat, dtype=args.dtype,
                                quant_sim=args.quant_sim, moe_impl=args.moe_impl)
    opt_cfg = OptimizerConfig(name=args.optimizer, learning_rate=args.lr, warmup_steps=args.warmup,
                              total_steps=args.steps, weight_decay=args.weight_decay, clip_norm=args.clip)
    lr = schedule(opt_cfg)
    wrt = add_adapters(model, args, mesh)  # --lora-rank: only the adapters train and are saved
    if args.indexer_loss == "dense":  # the warm-up trains the indexer alone
        wrt = indexer_params
    mtp = args.mtp_weight > 0 and bool(cfg.num_nextn_predict_layers)
    flops_per_token = train.model_flops_per_token(model.cfg, args.seq_len, mtp)
    with on_mesh:  # the optimizer's moments follow their parameters, its step count lands on the mesh
        opt = train.make_optimizer(model, opt_cfg, wrt=wrt)
        checkpoints = train.Checkpoints(args.out, max_to_keep=args.keep,  # LoRA: the adapters alone
                                        wrt=wrt if args.lora_rank is not None else None)
        step = 0
        if checkpoints.latest_step() is not None:
            step = checkpoints.restore(model, opt)
            batches.set_state(checkpoints.extra(step)["data"])
        elif not started:
            _start_run(args.out, args.ckpt, model.cfg.dtype)
        metrics_file = _metrics_up_to(args.out / METRICS, step)
        if step >= args.steps:
            print(f"{args.out}: already at step {step} (--steps {args.steps}); nothing to do", file=sys.stderr)
        bar = tqdm(total=args.steps, initial=step, desc=f"train {args.out.name}", unit="step", file=sys.stderr,
                   disable=step >= args.steps)
        with metrics_file, bar:
            while step < args.steps:
                batch = next(batches)
                start = time.perf_counter()
                metrics = train.train_step(model, opt, batch["input_ids"], batch["loss_mask"], batch["segment_ids"],
                                           mtp_weight=args.mtp_weight if mtp else 0.0,
                                           balance_weight=args.balance_weight,
                                           bias_update_rate=args.bias_update_rate, grad_accum=args.grad_accum,
                                           wrt=wrt, indexer_loss=args.indexer_loss,
                                           indexer_weight=args.indexer_weight,
                                           # masks from (seed, step): a resumed run draws the same ones
                                           dropout_key=jax.random.fold_in(jax.random.key(args.seed), step)
                                           if args.lora_rank is not None and args.lora_dropout else None)
                metrics = {k: v.tolist() for k, v in jax.device_get(metrics).items()}  # floats, per-layer lists
                seconds = time.perf_counter() - start
                tokens_per_s = float((batch["segment_ids"] > 0).sum()) / seconds
                record = {"step": step + 1, "loss": metrics["loss"], "nll": metrics["nll"],
                          "mtp_nll": metrics["mtp_nll"], "balance_loss": metrics["balance_loss"],
                          "lr": float(lr(step)), "grad_norm": metrics["grad_norm"], "tokens_per_s": tokens_per_s,
                          "mfu": (flops_per_token * tokens_per_s / (args.peak_tflops * 1e12)
                                  if args.peak_tflops else None),
                          "max_expert_load": metrics["max_expert_load"],
                          "expert_load_max": metrics["expert_load_max"],
                          "expert_load_min": metrics["expert_load_min"]}
                step += 1
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
                bar.update()
                if step % args.save_every == 0 or step == args.steps:
                    checkpoints.save(step, model, opt, extra={"data": batches.get_state()})


def _start_run(out: Path, ckpt: Path, dtype: str) -> None:
    """What makes OUT a checkpoint folder too: its base and the base's config and tokenizer files."""
    from v4jax.checkpoint.reader import COMPANION_FILES
    from v4jax.train import RUN_INFO

    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json",) + COMPANION_FILES:
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    (out / RUN_INFO).write_text(json.dumps({"base": str(ckpt), "dtype": dtype}) + "\n")


def _check_same_base(out: Path, ckpt: Path) -> None:
    from v4jax.train import training_run

    base = training_run(out)["base"]
    if base != str(ckpt):
        raise UsageError(f"--out {out}: a run from {base}, not from --ckpt {ckpt}")


def _metrics_up_to(path: Path, step: int):
    """metrics.jsonl opened for appending, cut to the lines of steps <= `step` (those after the
    checkpoint a killed run resumes from are run again)."""
    lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    path.write_text("".join(kept))
    return open(path, "a")
