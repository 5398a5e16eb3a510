"""Training step: v4jax against Hugging Face transformers' DeepSeek-V4 port, same weights, same run;
and the step's compile time at 4 against 43 layers.

Both sides load the bench config's random checkpoint (bench/common.py: v4jax through
`load_pretrained`, HF through `from_pretrained` on the same tensors in float32) and time one
training step on a [--batch, --seq] batch of random tokens: forward, backward (next-token loss),
global-norm clip at 1 and AdamW (b 0.9/0.95, weight decay 0.1), float32 on the CPU, best of
--reps after a warm-up (v4jax: after its compile). Each side runs in its own process so that
its peak resident memory is its own (`ru_maxrss`, the model and optimiser included). Then the
v4jax step (with the MTP loss) is compiled for the narrow Flash-pattern config of
bench/compile_bench.py at 4 and 43 layers (target: 43-layer / 4-layer < 2).

    pip install torch==2.13.0 transformers==5.24.0
    python bench/train_bench.py [--batch 2] [--seq 512] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import bench_config, best_seconds, float_copy
from compile_bench import narrow_flash
from v4jax import train
from v4jax.checkpoint import write_random_checkpoint
from v4jax.checkpoint.loading import load_pretrained
from v4jax.model import Transformer
from v4jax.optim import OptimizerConfig

ADAMW = OptimizerConfig(learning_rate=1e-4, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ours(published: Path, ids: np.ndarray, reps: int) -> dict:
    model = load_pretrained(published, dtype="float32", quant_sim=False)
    optimizer = train.make_optimizer(model, ADAMW)
    mask = np.ones_like(ids)

    def step():
        jax.block_until_ready(train.train_step(model, optimizer, ids, mask)["loss"])

    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    return {"seconds": best_seconds(step, reps), "first_step_s": first, "peak_rss_mb": peak_rss_mb()}


def theirs(folder: Path, ids: np.ndarray, reps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW.learning_rate, betas=(ADAMW.b1, ADAMW.b2),
                                  eps=ADAMW.eps, weight_decay=ADAMW.weight_decay)
    batch = torch.from_numpy(ids).long()

    def step():
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ADAMW.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"seconds": best_seconds(step, reps), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "peak_rss_mb": peak_rss_mb()}


def compile_seconds(cfg) -> float:
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    optimizer = train.make_optimizer(model, ADAMW)
    ids = jnp.zeros((1, 256), jnp.int32)
    start = time.perf_counter()
    train.train_step.lower(model, optimizer, ids, jnp.ones_like(ids), mtp_weight=0.3).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--side", choices=("v4jax", "hf"), help=argparse.SUPPRESS)  # a child process's side
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = bench_config()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq), dtype=np.int32)
    if args.side:
        run = ours if args.side == "v4jax" else theirs
        print(json.dumps(run(args.folder / ("published" if args.side == "v4jax" else "float"), ids, args.reps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        float_copy(write_random_checkpoint(cfg, folder / "published"), folder / "float")
        results = {}
        for side in ("v4jax", "hf"):
            out = subprocess.run([sys.executable, __file__, "--side", side, "--folder", str(folder),
                                  "--batch", str(args.batch), "--seq", str(args.seq), "--reps", str(args.reps)],
                                 capture_output=True, text=True, check=True)
            results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    tokens = args.batch * args.seq
    a, b = results["v4jax"], results["hf"]
    print(f"training step (forward + backward + clip + AdamW), float32, CPU, batch {args.batch} x {args.seq} tokens; "
          f"{cfg.num_hidden_layers} layers {list(cfg.compress_ratios)}, E={cfg.n_routed_experts} "
          f"k={cfg.num_experts_per_tok}; torch {b['torch']} with {b['threads']} threads")
    print(f"{'':>8} {'step s':>8} {'tokens/s':>9} {'peak RSS MB':>12}")
    for name, r in (("v4jax", a), ("HF", b)):
        print(f"{name:>8} {r['seconds']:8.3f} {tokens / r['seconds']:9.0f} {r['peak_rss_mb']:12.0f}")
    ratio = b["seconds"] / a["seconds"]
    print(f"v4jax / HF throughput: {ratio:.2f}x (goal >= 3x) -> {'OK' if ratio >= 3 else 'MISSED'}; "
          f"v4jax's first step (compile included) {a['first_step_s']:.1f} s")

    times = {depth: compile_seconds(narrow_flash(depth)) for depth in (4, 43)}
    ratio = times[43] / times[4]
    print(f"train-step compile: 4 layers {times[4]:.1f} s, 43 layers {times[43]:.1f} s -> {ratio:.2f}x "
          f"(target < 2x) -> {'OK' if ratio < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
