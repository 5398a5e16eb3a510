"""Prefill time: v4jax against Hugging Face transformers' DeepSeek-V4 port, same weights, same run.

A small published-layout checkpoint of random weights (`write_random_checkpoint`:
FP8 linears, FP4 experts) is loaded by both: v4jax through `load_pretrained`, HF
through `from_pretrained` on the same tensors dequantised to float32 under their
published names (HF's own renaming maps them onto its modules). Both run float32
on the CPU without quantisation-aware simulation. The logits of one prompt are
compared first (up to the position where a CSA query sees more compressed entries
than the indexer keeps, and over the whole prompt); then each prefill of --lengths tokens (batch 1) is timed: the
median of --reps runs after a warm-up (v4jax: after its compile), v4jax and HF interleaved (CPU timings on a
shared machine are noisy).

    pip install torch==2.13.0 transformers==5.24.0
    python bench/prefill_bench.py [--lengths 512,2048,8192] [--reps 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from common import bench_config, load_both, median_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="512,2048,8192")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    cfg = bench_config()
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = load_both(cfg, Path(tmp))
    forward = jax.jit(lambda m, ids: m(ids))

    def ours(ids):
        return np.asarray(jax.block_until_ready(forward(model, jnp.asarray(ids))))

    def theirs(ids):
        with torch.no_grad():
            return hf(torch.from_numpy(ids).long()).logits.numpy()

    lengths = [int(n) for n in args.lengths.split(",")]
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, lengths[0]), dtype=np.int32)
    a, b = ours(ids), theirs(ids)
    # Until a CSA query sees more than index_topk compressed entries, the indexer selects them all.
    unselective = 4 * (cfg.index_topk + 1) - 1
    diff = np.abs(a - b).max(axis=(0, 2))
    print(f"logits at {lengths[0]} tokens (max |logit| {np.abs(b).max():.2f}): max |v4jax - HF| = "
          f"{diff[:unselective].max():.2e} over positions < {unselective} (every entry selected), "
          f"{diff.max():.2e} over all; same argmax {np.mean(a.argmax(-1) == b.argmax(-1)):.1%}")
    print(f"prefill, batch 1, float32, CPU ({jax.device_count()} JAX device, torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads); {cfg.num_hidden_layers} layers {list(cfg.compress_ratios)}, "
          f"E={cfg.n_routed_experts} k={cfg.num_experts_per_tok}")
    print(f"{'tokens':>7} {'v4jax s':>8} {'HF s':>8} {'HF/v4jax':>9}")
    for n in lengths:
        ids = np.random.default_rng(n).integers(0, cfg.vocab_size, (1, n), dtype=np.int32)
        t = median_seconds({"ours": lambda: ours(ids), "hf": lambda: theirs(ids)}, args.reps)
        t_ours, t_hf = t["ours"], t["hf"]
        print(f"{n:>7} {t_ours:8.3f} {t_hf:8.3f} {t_hf / t_ours:9.2f}", flush=True)


if __name__ == "__main__":
    main()
