"""Decode speed: MTP speculative decoding, and continuous against static batching.

1. A two-layer tiny model (CSA ratio 4, HCA ratio 128, MTP block; float32) is first
   fine-tuned with v4jax.train (train_step, make_optimizer, main + MTP loss) on a
   repetitive corpus (random phrases of a small phrase book), so the MTP block predicts
   the next-but-one token well. Then greedy decode of continuations with and without
   speculation: draft acceptance rate, tokens per verify step, decode tokens/s, speed-up.
   Goal: >= 1.6x at acceptance >= 0.8.
2. A mixed workload (requests with prompts and output budgets drawn uniformly) through
   the same slots and programs, continuously batched (a finished slot takes the next
   request at once) and statically (a batch of requests waits for its longest one):
   generated tokens per second. Goal: >= 2x. The issue's workload is 64 requests,
   prompts 16-1,024, outputs 8-256 (--requests 64 --max-prompt 1024 --max-output 256);
   the defaults are scaled down to keep a run to a few minutes on a small CPU.

Every program is compiled before the timed runs (same widths in both modes).

    python bench/decode_speed_bench.py [--train-steps 150] [--requests 32] [--max-prompt 512] [--max-output 128]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.generate import Generator, Request
from v4jax.model import Transformer
from v4jax.optim import OptimizerConfig
from v4jax.sampling import Sampling
from v4jax.data import pack_rows, training_batches
from v4jax.train import make_optimizer, train_step

ROOT = Path(__file__).resolve().parents[1]
GREEDY = Sampling(temperature=0)


def tiny_model() -> Transformer:
    raw = json.loads((ROOT / "configs/tiny.json").read_text())
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    return Transformer(ModelConfig.from_dict(raw, dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))


def corpus(rng: np.random.Generator, n_docs: int, vocab: int) -> tuple[list[list[int]], np.ndarray]:
    """Documents of random phrases from a fixed book of 8 phrases of 16 tokens: after a phrase's first
    token the rest is determined, so a trained model (and its MTP block) mostly knows what comes next."""
    book = rng.integers(2, vocab, (8, 16))
    docs = [list(map(int, book[rng.integers(0, 8, 20)].ravel())) for _ in range(n_docs)]
    return docs, book


def fine_tune(model, steps: int) -> tuple[float, float]:
    docs, _ = corpus(np.random.default_rng(0), 256, model.cfg.vocab_size)
    batches = training_batches(pack_rows([(d, [1] * len(d)) for d in docs], seq_len=256), batch_size=8)
    optimizer = make_optimizer(model, OptimizerConfig(learning_rate=3e-3, weight_decay=0.0, warmup_steps=10))
    for _ in range(steps):
        batch = next(batches)
        metrics = train_step(model, optimizer, batch["input_ids"], batch["loss_mask"], batch["segment_ids"],
                             mtp_weight=1.0)
    return float(metrics["nll"]), float(metrics["mtp_nll"])


def speculation(model, batch: int, new_tokens: int) -> dict:
    docs, _ = corpus(np.random.default_rng(1), batch, model.cfg.vocab_size)
    prompts = [d[:64] for d in docs]
    figures = {}
    for spec in (False, True):
        gen = Generator(model, batch_size=batch, max_len=64 + new_tokens + 2, prefill_chunk=64, min_bucket=64,
                        speculative=spec)
        gen.generate(prompts, 8, GREEDY)  # compile
        out = gen.generate(prompts, new_tokens, GREEDY)
        figures[spec] = out
    plain, spec = figures[False], figures[True]
    return {"identical": [s.tokens for s in plain.sequences] == [s.tokens for s in spec.sequences],
            "acceptance": spec.acceptance,
            "tokens_per_verify_step": spec.decode_tokens / max(spec.decode_steps, 1) / batch,
            "plain_tokens_per_s": plain.decode_tokens_per_second,
            "speculative_tokens_per_s": spec.decode_tokens_per_second,
            "speedup": spec.decode_tokens_per_second / plain.decode_tokens_per_second}


def workload(rng, n: int, max_prompt: int, max_output: int, vocab: int) -> list[Request]:
    return [Request(list(map(int, rng.integers(2, vocab, rng.integers(16, max_prompt + 1)))),
                    int(rng.integers(8, max_output + 1)), GREEDY) for _ in range(n)]


def batching(model, slots: int, n: int, max_prompt: int, max_output: int, chunk: int) -> dict:
    requests = workload(np.random.default_rng(2), n, max_prompt, max_output, model.cfg.vocab_size)
    gen = Generator(model, batch_size=slots, max_len=max_prompt + max_output + 2, prefill_chunk=chunk)
    widths = [1 << k for k in range(4, chunk.bit_length())]  # every prefill bucket, then decode
    for w in widths:  # compile every program: a first chunk shared with a decoding slot's start, then
        # a chunk of w tokens on its own row while that slot decodes
        list(gen.serve([Request([2] * 16, 8, GREEDY), Request([2] * (chunk + w), 2, GREEDY)]))
    total = sum(min(r.max_new_tokens, gen.max_len + 1 - len(r.prompt)) for r in requests)

    t0 = time.perf_counter()
    continuous = sum(len(c.tokens) for _, c in gen.serve(requests))
    t_cont = time.perf_counter() - t0
    t0 = time.perf_counter()
    static = 0
    for first in range(0, n, slots):  # each batch waits for its longest request
        static += sum(len(c.tokens) for _, c in gen.serve(requests[first:first + slots]))
    t_static = time.perf_counter() - t0
    assert continuous == static == total
    return {"requests": n, "slots": slots, "generated_tokens": total, "continuous_tokens_per_s": total / t_cont,
            "static_tokens_per_s": total / t_static, "speedup": t_static / t_cont}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--batch", type=int, default=1, help="sequences in the speculation comparison")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk (power of two)")
    args = ap.parse_args()

    model = tiny_model()
    t0 = time.perf_counter()
    nll, mtp_nll = fine_tune(model, args.train_steps)
    print(f"fine-tuned {args.train_steps} steps in {time.perf_counter() - t0:.0f} s: next-token NLL {nll:.3f}, "
          f"MTP NLL {mtp_nll:.3f}")
    s = speculation(model, args.batch, args.new_tokens)
    print(f"speculative (MTP draft), batch {args.batch}, {args.new_tokens} greedy tokens "
          f"({'identical to' if s['identical'] else 'DIFFERENT from'} plain): "
          f"acceptance {s['acceptance']:.2f}, {s['tokens_per_verify_step']:.2f} tokens per verify step, "
          f"{s['speculative_tokens_per_s']:.1f} vs {s['plain_tokens_per_s']:.1f} tokens/s plain "
          f"-> {s['speedup']:.2f}x (goal >= 1.6x at acceptance >= 0.8)")
    b = batching(model, args.slots, args.requests, args.max_prompt, args.max_output, args.chunk)
    print(f"batching, {b['requests']} requests (prompts 16-{args.max_prompt}, outputs 8-{args.max_output}) "
          f"through {b['slots']} slots, {b['generated_tokens']} tokens: continuous "
          f"{b['continuous_tokens_per_s']:.1f} vs static {b['static_tokens_per_s']:.1f} tokens/s "
          f"-> {b['speedup']:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
