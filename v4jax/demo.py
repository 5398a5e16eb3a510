"""The whole pipeline on an embedded tiny model, on 8 simulated CPU devices (`v4jax demo`).

1. write a random checkpoint in the published FP8/FP4 safetensors layout;
2. convert it to an Orbax checkpoint;
3. load it sharded over a data x expert x tensor mesh of simulated devices;
4. generate a batch of prompts of different lengths (chunked prefill, FP8 KV cache);
5. print the completions, tokens/s and KV-cache bytes per token.

`python bench/decode_bench.py` prints the KV-cache figures of Flash and Pro at 1M tokens.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TextIO

import jax
import numpy as np

from v4jax.config import ModelConfig

# configs/tiny.json (every layer kind: window-only, CSA, HCA; hash and score routing; MTP) with an
# expert width of 256, so that the tensor axis splits it into whole 128-wide FP8 activation blocks.
TINY = {
    "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 6, "num_attention_heads": 4, "head_dim": 128,
    "qk_rope_head_dim": 64, "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 64, "sliding_window": 128,
    "compress_ratios": [0, 4, 128, 4, 128, 4, 0], "compress_rope_theta": 160000, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "index_n_heads": 4, "index_head_dim": 128, "index_topk": 8, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "moe_intermediate_size": 256, "routed_scaling_factor": 1.5, "num_hash_layers": 2, "swiglu_limit": 10.0,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
}
MESH = "data=2,expert=2,tensor=2"
PROMPT_LENGTHS = (7, 40, 150, 300)  # one ends inside the first window, one crosses two 128-groups


def run_demo(workdir: str | Path | None = None, *, config: ModelConfig | None = None, mesh_spec: str = MESH,
             max_new_tokens: int = 32, seed: int = 0, out: TextIO | None = None) -> dict:
    """Run the pipeline (in `workdir`, or a temporary folder), print to `out` (default stdout), return its figures."""
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="v4jax-demo-") as tmp:
            return run_demo(tmp, config=config, mesh_spec=mesh_spec, max_new_tokens=max_new_tokens, seed=seed,
                            out=out)
    from v4jax import load_pretrained
    from v4jax.cache import cache_bytes_per_token
    from v4jax.checkpoint import convert, write_random_checkpoint
    from v4jax.generate import Generator
    from v4jax.sampling import Sampling
    from v4jax.sharding import describe, make_mesh

    def say(line: str) -> None:
        (out or sys.stdout).write(line + "\n")
        (out or sys.stdout).flush()

    cfg = config or ModelConfig.from_dict(TINY)
    workdir = Path(workdir)
    published = write_random_checkpoint(cfg, workdir / "published", seed=seed)
    say(f"1. random checkpoint, published layout: {published} ({_size(published)})")
    converted = workdir / "converted"
    convert(published, converted)
    say(f"2. converted to Orbax: {converted} ({_size(converted)})")
    mesh = make_mesh(mesh_spec, devices=jax.devices("cpu"))
    model = load_pretrained(converted, mesh=mesh)
    say(f"3. loaded on a {describe(mesh)} mesh of {mesh.size} simulated CPU devices")

    rng = np.random.default_rng(seed)
    prompts = [[0] + rng.integers(2, cfg.vocab_size, n - 1).tolist() for n in PROMPT_LENGTHS]
    max_len = max(PROMPT_LENGTHS) + max_new_tokens
    gen = Generator(model, batch_size=len(prompts), max_len=max_len, prefill_chunk=128, min_bucket=128,
                    quantized_cache=True, mesh=mesh)  # one prefill width: one compile
    result = gen.generate(prompts, max_new_tokens, Sampling(temperature=0.8, top_p=0.95), seed=seed,
                          stop_tokens=[1])
    say(f"4. generated (prompts of {', '.join(map(str, PROMPT_LENGTHS))} tokens, temperature 0.8, top-p 0.95):")
    for n, seq in zip(PROMPT_LENGTHS, result.sequences):
        say(f"   [{n:3d}] {' '.join(map(str, seq.tokens[:16]))}{' ...' if len(seq.tokens) > 16 else ''} "
            f"({len(seq.tokens)} tokens, {seq.finish_reason})")
    figures = {
        "prefill_seconds": result.prefill_seconds,
        "decode_tokens_per_second": result.decode_tokens_per_second,
        "kv_bytes_per_token": cache_bytes_per_token(cfg, max_len, quantized=True),
        "kv_bytes_per_token_1m": cache_bytes_per_token(cfg, 1 << 20, quantized=True),
    }
    say(f"5. prefill {result.prompt_tokens} tokens in {figures['prefill_seconds']:.1f} s (compiles included); "
        f"decode {figures['decode_tokens_per_second']:.1f} tokens/s at batch {len(prompts)}")
    say(f"   KV cache, FP8 layout: {figures['kv_bytes_per_token']:.0f} bytes/token at {max_len} tokens (window "
        f"and compressor carries included), {figures['kv_bytes_per_token_1m']:.0f} bytes/token at 1M tokens")
    return figures


def _size(path: Path) -> str:
    return f"{sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20:.1f} MiB"
