"""Decode speed: MTP speculative decoding, and continuous against static batching.

1. A two-layer tiny model (CSA ratio 4, HCA ratio 128, MTP block; float32) is first
   fine-tuned with v4jax.train (train_step, make_optimizer, main + MTP loss) on a
   repetitive corpus (random phrases of a small phrase book), so the MTP block predicts
   the next-but-one token well. Then greedy decode of continuations with and without
   speculation: draft acceptance rate, tokens per verify step, decode tokens/s, speed-up.
   Goal: >= 1.6x at acceptance >= 0.8.
2. A mixed workload (64 requests, prompts 16-1,024 tokens, outputs 8-256, drawn uniformly) through
   the same slots and programs: continuously batched (a finished slot takes the next request at
   once, its prompt fed in chunks that every refilling slot shares, between the decoding slots'
   steps), statically (waves of `slots` requests, each prefilled together and decoded in lockstep
   until its longest output is done), and as waves through the continuous scheduler (a wave's
   slots refilled only when all of it is done): generated tokens per second. Goal: >= 2x over
   static. Every program is compiled first (Generator.warm_up); the modes alternate, `--repeats`
   times, and the figures are medians (the machine may be shared).

    python bench/decode_speed_bench.py [--train-steps 150] [--requests 64] [--max-prompt 1024] [--max-output 256]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.generate import DECODE_STEPS, Generation, Generator, Request
from v4jax.model import Transformer
from v4jax.optim import OptimizerConfig
from v4jax.sampling import Sampling
from v4jax.data import pack_rows, training_batches
from v4jax.tokens import bucket
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


def static_batch(gen: Generator, wave: list[Request]) -> int:
    """Static batching as HF generate does it: the wave's prompts prefilled together (shared [batch, width]
    chunks, each padded to the wave's longest chunk: rows whose prompt is done ride along as padding), then
    every row decodes in lockstep until the wave's longest output is done (a finished row is fed nothing
    but its batch row is still computed). The generator's own programs: prefill chunks, then the on-device
    decode loop (DECODE_STEPS steps per dispatch). Returns the tokens generated."""
    prompts = [r.prompt for r in wave] + [[]] * (gen.batch_size - len(wave))
    budgets = np.array([min(r.max_new_tokens, gen.max_len + 1 - len(r.prompt)) for r in wave]
                       + [0] * (gen.batch_size - len(wave)))
    controls = gen.controls(GREEDY)
    tokens, _, state = gen.prefill(gen.new_state(), prompts, controls)
    left = np.maximum(budgets - 1, 0)  # the first token comes with the prompt; the last is never fed back
    while left.any():
        drawn, state = gen.decode_steps(state, tokens, left, controls)
        for b in np.flatnonzero(left):
            row = drawn[b][drawn[b] >= 0]
            tokens[b], left[b] = row[-1], left[b] - len(row)
    return int(budgets.sum())


def batching(model, slots: int, n: int, max_prompt: int, max_output: int, chunk: int, repeats: int) -> dict:
    """Continuous batching (serve: a freed slot takes the next request at once), static batching
    (static_batch, waves of `slots` requests) and waves through serve (a wave's requests admitted
    together, its slots refilled only when all are done), one generator for all (same programs, all
    compiled first), alternated `repeats` times; medians. Each serve run's wall time splits into
    steps that fed prompt chunks, steps that only decoded, and the host's share."""
    requests = workload(np.random.default_rng(2), n, max_prompt, max_output, model.cfg.vocab_size)
    gen = Generator(model, batch_size=slots, max_len=max_prompt + max_output + 2, prefill_chunk=chunk)
    programs = gen.warm_up()
    total = sum(min(r.max_new_tokens, gen.max_len + 1 - len(r.prompt)) for r in requests)
    waves = [requests[i:i + slots] for i in range(0, n, slots)]
    modes = {"continuous": [requests], "static": None, "waves": waves}
    runs = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, queues in modes.items():
            stats = Generation([], 0)
            t0 = time.perf_counter()
            if queues is None:
                generated = sum(static_batch(gen, wave) for wave in waves)
            else:
                generated = sum(len(c.tokens) for queue in queues for _, c in gen.serve(queue, stats=stats))
            seconds = time.perf_counter() - t0
            assert generated == total
            runs[mode].append((seconds, stats.prefill_seconds, stats.decode_seconds, stats.decode_steps))
    budgets = [min(r.max_new_tokens, gen.max_len + 1 - len(r.prompt)) for r in requests]
    prompts = [len(r.prompt) for r in requests]
    # prompt rows static batching feeds: per wave, per chunk, every row at the width of the longest
    padded = sum(slots * sum(bucket(min(chunk, top - c), gen.min_bucket) for c in range(0, top, chunk))
                 for top in (max(prompts[i:i + slots]) for i in range(0, n, slots)))
    out = {"requests": n, "slots": slots, "programs": programs, "generated_tokens": total,
           "compiles_during_runs": gen.compiled_shapes() - programs, "static_prompt_rows": padded,
           # decode steps static batching takes (each wave's longest output; its first token comes
           # with the prompt) and the fewest any schedule of `slots` slots can take
           "static_decode_steps": sum(max(budgets[i:i + slots]) - 1 for i in range(0, n, slots)),
           "min_decode_steps": -(-(total - n) // slots),
           "prompt_tokens": sum(len(r.prompt) for r in requests), "repeats": repeats}
    for mode, r in runs.items():
        seconds, prefill, decode, steps = np.median(np.array(r), axis=0)
        out[mode] = {"tokens_per_s": total / seconds, "seconds": seconds, "prefill_steps_s": prefill,
                     "decode_steps_s": decode, "host_s": seconds - prefill - decode, "decode_steps": int(steps),
                     # continuous's speed-up over this mode, median over the repeats (each repeat's pair)
                     "speedup": float(np.median([m[0] / c[0] for c, m in zip(runs["continuous"], r)]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-steps", type=int, default=150)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--batch", type=int, default=1, help="sequences in the speculation comparison")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=128, help="prefill chunk (power of two)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each batching mode (medians)")
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
    b = batching(model, args.slots, args.requests, args.max_prompt, args.max_output, args.chunk, args.repeats)
    print(f"batching, {b['requests']} requests (prompts 16-{args.max_prompt}, {b['prompt_tokens']} tokens; outputs "
          f"8-{args.max_output}, {b['generated_tokens']} tokens) through {b['slots']} slots, {b['programs']} "
          f"programs, medians of {b['repeats']} alternated runs: continuous {b['continuous']['tokens_per_s']:.1f} "
          f"vs static {b['static']['tokens_per_s']:.1f} tokens/s -> {b['static']['speedup']:.2f}x (goal >= 2x); "
          f"vs waves through serve {b['waves']['tokens_per_s']:.1f} tokens/s -> {b['waves']['speedup']:.2f}x")
    print(f"  static: per wave of {b['slots']} requests, the prompts prefilled together in [{b['slots']}, "
          f"<={args.chunk}] chunks (each padded to the wave's longest row), then lockstep decode until the "
          f"wave's longest output (finished rows still computed), {DECODE_STEPS} steps per dispatch")
    print(f"  continuous: a freed slot takes the next request at once; the refilling slots' prompts go in "
          f"shared [bucketed count, <={args.chunk}] chunks, one decode step of the other slots after each; "
          f"otherwise up to {DECODE_STEPS} decode steps per dispatch, returning when a sequence ends")
    print(f"  decode steps: static {b['static_decode_steps']}, continuous {b['continuous']['decode_steps']} "
          f"(no schedule of {b['slots']} slots takes fewer than {b['min_decode_steps']}); prompt rows fed: static "
          f"{b['static_prompt_rows']} (padded), continuous {b['prompt_tokens']} (+ bucketing of the refill count)")
    ceiling = max(b['static_decode_steps'] / b['min_decode_steps'], b['static_prompt_rows'] / b['prompt_tokens'])
    print(f"  ceiling: with costs proportional to steps and rows, no continuous schedule beats static by more "
          f"than {ceiling:.2f}x on this workload (the larger of the decode-step and prompt-row ratios)")
    for mode in ("continuous", "waves"):
        m = b[mode]
        print(f"  {mode}: {m['seconds']:.1f} s = prompt-chunk steps {m['prefill_steps_s']:.1f} s + "
              f"{m['decode_steps']} decode steps {m['decode_steps_s']:.1f} s + host {m['host_s']:.1f} s")
    print(f"  static: {b['static']['seconds']:.1f} s; programs compiled during the timed runs: "
          f"{b['compiles_during_runs']}")


if __name__ == "__main__":
    main()
