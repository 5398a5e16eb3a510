"""Scoring throughput: `v4jax.evaluate` against Hugging Face transformers' DeepSeek-V4 port on the
same documents, weights and config (float32, CPU, same run), and the padding of a mixed-length set.

Both score every token of each document after its first (log-softmax of one full forward):
v4jax through its length-bucketed batches, HF one document per forward (what lm-eval's HF
model does at batch size 1). The scores are compared first; tokens/s is best of --reps after a
warm-up (v4jax: after its compile). Then a mixed-length data set (log-uniform 16 .. 2048 tokens)
is planned into batches and its padded fraction printed, against one padded width for all.

    pip install torch==2.13.0 transformers==5.24.0
    python bench/eval_bench.py [--tokens 2048] [--docs 4] [--reps 2]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import jax
import numpy as np
import torch

from common import bench_config, best_seconds, load_both
from v4jax import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per document")
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    cfg = bench_config()
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = load_both(cfg, Path(tmp))
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, cfg.vocab_size, args.tokens).tolist() for _ in range(args.docs)]
    windows = [w for i, d in enumerate(docs) for w in evaluate.document_windows(i, d, args.tokens)]
    batches = evaluate.plan_batches(windows)

    def ours():
        return dict(evaluate.score(model, windows, batches))

    def theirs():
        out = {}
        with torch.no_grad():
            for i, d in enumerate(docs):
                ids = torch.tensor([d])
                logp = torch.log_softmax(hf(ids).logits[0, :-1].double(), -1)
                out[i] = logp.gather(-1, ids[0, 1:, None])[:, 0].sum().item()
        return out

    a, b = ours(), theirs()
    worst = max(abs(a[i].loglikelihood - b[i]) / abs(b[i]) for i in b)
    print(f"document log-likelihoods: max relative |v4jax - HF| = {worst:.1e}")
    n = sum(len(d) - 1 for d in docs)
    t_ours, t_hf = best_seconds(ours, args.reps), best_seconds(theirs, args.reps)
    print(f"scoring {args.docs} documents x {args.tokens} tokens, float32, CPU ({jax.device_count()} JAX device, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads); {cfg.num_hidden_layers} layers "
          f"{list(cfg.compress_ratios)}, E={cfg.n_routed_experts} k={cfg.num_experts_per_tok}")
    print(f"{'':>6} {'tokens/s':>10}\n{'v4jax':>6} {n / t_ours:10.0f}\n{'HF':>6} {n / t_hf:10.0f}\n"
          f"v4jax / HF = {t_hf / t_ours:.2f}x")

    lengths = np.exp(rng.uniform(np.log(16), np.log(2048), 1000)).astype(int)
    mixed = [evaluate.Window(i, tuple(range(int(k))), 1, int(k)) for i, k in enumerate(lengths)]
    plan = evaluate.plan_batches(mixed)
    one_width = 1 - lengths.sum() / (len(lengths) * 2048)
    print(f"mixed-length set (1000 documents, 16 .. 2048 tokens, log-uniform): padded fraction "
          f"{evaluate.padded_fraction(plan):.1%} in {len(plan)} batches over {len({b.width for b in plan})} widths "
          f"(one padded width for all: {one_width:.1%})")


if __name__ == "__main__":
    main()
