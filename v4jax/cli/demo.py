"""`v4jax demo`: the whole pipeline on the packaged tiny model, on 8 simulated CPU devices.

1. write a random checkpoint in the published FP8/FP4 safetensors layout;
2. convert it to an Orbax checkpoint;
3. load it sharded over a data x expert x tensor mesh of simulated devices;
4. generate a batch of prompts of different lengths (chunked prefill, FP8 KV cache);
5. print the completions, tokens/s and KV-cache bytes per token.

`python bench/decode_bench.py` prints the KV-cache figures of Flash and Pro at 1M tokens.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from v4jax.cli.common import CONFIGS, UsageError, dir_to_use, positive_int, prng_seed
from v4jax.config import ModelConfig

MESH = "data=2,expert=2,tensor=2"
PROMPT_LENGTHS = (7, 40, 150, 300)  # one ends inside the first window, one crosses two 128-groups
# configs/tiny.json (every layer kind: window-only, CSA, HCA; hash and score routing; MTP) with an
# expert width of 256, so that the tensor axis splits it into whole 128-wide FP8 activation blocks
EXPERT_WIDTH = 256


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help="the whole pipeline on a tiny model over 8 simulated devices",
                       description="Write a random checkpoint, convert it, load it sharded over 8 simulated "
                                   "CPU devices, generate a batch, print tokens/s and KV-cache bytes per token.")
    p.add_argument("--workdir", type=dir_to_use, help="keep the checkpoints here (default: a temporary folder)")
    p.add_argument("--max-new-tokens", type=positive_int, default=32)
    p.add_argument("--seed", type=prng_seed, default=0)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from v4jax.sharding import simulate_cpu_devices

    limit = ModelConfig.from_json(Path(str(CONFIGS / "tiny.json"))).max_position_embeddings
    if max(PROMPT_LENGTHS) + args.max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens}: prompts of up to {max(PROMPT_LENGTHS)} tokens "
                         f"and that many more exceed the tiny model's max_position_embeddings {limit}")
    if args.workdir is not None:
        taken = [p for p in (args.workdir / "published", args.workdir / "converted") if p.exists()]
        if taken:
            raise UsageError(f"{taken[0]}: already exists; refusing to overwrite (give a new --workdir)")
    simulate_cpu_devices(8)
    run_demo(args.workdir, max_new_tokens=args.max_new_tokens, seed=args.seed)


def run_demo(workdir: Path | None, *, max_new_tokens: int = 32, seed: int = 0) -> dict:
    """Run the pipeline in `workdir` (or a temporary folder), print each stage, return its figures."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="v4jax-demo-") as tmp:
            return run_demo(Path(tmp), max_new_tokens=max_new_tokens, seed=seed)
    import jax
    import numpy as np

    from v4jax import load_pretrained
    from v4jax.cache import cache_bytes_per_token
    from v4jax.checkpoint import convert, write_random_checkpoint
    from v4jax.generate import Generator
    from v4jax.sampling import Sampling
    from v4jax.sharding import describe, make_mesh

    cfg = ModelConfig.from_json(Path(str(CONFIGS / "tiny.json"))).replace(moe_intermediate_size=EXPERT_WIDTH)
    published = write_random_checkpoint(cfg, workdir / "published", seed=seed)
    print(f"1. random checkpoint, published layout: {published} ({_size(published)})", flush=True)
    converted = workdir / "converted"
    convert(published, converted)
    print(f"2. converted to Orbax: {converted} ({_size(converted)})", flush=True)
    mesh = make_mesh(MESH, devices=jax.devices("cpu"))
    model = load_pretrained(converted, mesh=mesh)
    print(f"3. loaded on a {describe(mesh)} mesh of {mesh.size} simulated CPU devices", flush=True)

    rng = np.random.default_rng(seed)
    prompts = [[0] + rng.integers(2, cfg.vocab_size, n - 1).tolist() for n in PROMPT_LENGTHS]
    max_len = max(PROMPT_LENGTHS) + max_new_tokens
    gen = Generator(model, batch_size=len(prompts), max_len=max_len, prefill_chunk=128, min_bucket=128,
                    quantized_cache=True, mesh=mesh)  # one prefill width: one compile
    result = gen.generate(prompts, max_new_tokens, Sampling(temperature=0.8, top_p=0.95), seed=seed,
                          stop_tokens=[1])
    print(f"4. generated (prompts of {', '.join(map(str, PROMPT_LENGTHS))} tokens, temperature 0.8, top-p 0.95):")
    for n, seq in zip(PROMPT_LENGTHS, result.sequences):
        print(f"   [{n:3d}] {' '.join(map(str, seq.tokens[:16]))}{' ...' if len(seq.tokens) > 16 else ''} "
              f"({len(seq.tokens)} tokens, {seq.finish_reason})")
    figures = {
        "prefill_seconds": result.prefill_seconds,
        "decode_tokens_per_second": result.decode_tokens_per_second,
        "kv_bytes_per_token": cache_bytes_per_token(cfg, max_len, quantized=True),
        "kv_bytes_per_token_1m": cache_bytes_per_token(cfg, 1 << 20, quantized=True),
    }
    print(f"5. prefill {result.prompt_tokens} tokens in {figures['prefill_seconds']:.1f} s (compiles included); "
          f"decode {figures['decode_tokens_per_second']:.1f} tokens/s at batch {len(prompts)}")
    print(f"   KV cache, FP8 layout: {figures['kv_bytes_per_token']:.0f} bytes/token at {max_len} tokens (window "
          f"and compressor carries included), {figures['kv_bytes_per_token_1m']:.0f} bytes/token at 1M tokens")
    return figures


def _size(path: Path) -> str:
    return f"{sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20:.1f} MiB"
