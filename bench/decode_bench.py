"""Decode cost against context length, and KV-cache bytes per token at 1M tokens.

1. Decode-step time at contexts 1K, 4K, 16K and 64K for a narrow V4 model (CSA and
   HCA layers) against a dense baseline of the same width measured in the same run:
   the same model with every layer window-only and the window as long as the
   context, i.e. single-KV-head (MQA/MLA-style) full attention over the whole context.
   A decode step's work depends on the context length only, not on the cached
   values, so each context starts from an empty cache positioned at that length.
   The V4 step should stay within 2x from 1K to 64K while the dense one grows.
2. KV-cache bytes per token of Flash and Pro at 1M tokens, from the shapes of the
   real cache arrays (`cache_bytes_per_token`: `init_cache` under `jax.eval_shape`), in
   the FP8 (FlashMLA) layout and in bf16, against a DeepSeek-V3.2-style cache
   (61 layers of MLA 656 B + indexer 132 B per token in FP8, 1152 + 256 B in bf16).

    python bench/decode_bench.py [--steps 20] [--contexts 1024,4096,16384,65536] [--skip-timing]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from v4jax.cache import cache_bytes_per_token
from v4jax.config import ModelConfig
from v4jax.generate import Generator
from v4jax.model import Transformer
from v4jax.sampling import Sampling

ROOT = Path(__file__).resolve().parents[1]

# Narrow but with the real head geometry (head_dim 512, RoPE 64, indexer dim 128,
# top-512 selection, 128-token window): 2 layers of Flash's repeated CSA/HCA unit.
NARROW = dict(hidden_size=256, num_attention_heads=8, head_dim=512, q_lora_rank=128, o_groups=2,
              o_lora_rank=128, index_n_heads=4, index_head_dim=128, index_topk=512, n_routed_experts=4,
              num_experts_per_tok=2, moe_intermediate_size=256, vocab_size=2048, num_hash_layers=0,
              num_nextn_predict_layers=0)
V4_RATIOS = [4, 128]

# DeepSeek-V3.2: 61 layers; per token and layer an MLA latent (512 + 64 RoPE dims) and an indexer key (128).
V32_LAYERS = 61
V32_FP8 = 656 + 132  # FlashMLA FP8 MLA entry + FP8 indexer key with its scale
V32_BF16 = (512 + 64) * 2 + 128 * 2


def narrow_config(ratios: list[int], window: int) -> ModelConfig:
    raw = json.loads((ROOT / "configs/tiny.json").read_text())
    raw.update(NARROW, num_hidden_layers=len(ratios), compress_ratios=ratios, sliding_window=window)
    return ModelConfig.from_dict(raw, dtype="bfloat16")


def step_ms(cfg: ModelConfig, context: int, steps: int) -> float:
    """Best wall time over `steps` batch-1 decode steps (sampling and host round trip included) at `context`.

    The minimum, as timeit reports, is the figure least disturbed by other load on the machine.
    """
    gen = Generator(Transformer(cfg, rngs=nnx.Rngs(0)), batch_size=1, max_len=context + steps + 2,
                    quantized_cache=True)
    controls = gen.controls(Sampling(temperature=0))
    state = gen.new_state()
    state["pos"] = jnp.full((1,), context, jnp.int32)
    token, active = np.zeros(1, np.int32), np.ones(1, bool)
    token, _, state = gen.decode(state, token, active, controls)  # compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token, _, state = gen.decode(state, token, active, controls)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def timing(contexts: list[int], steps: int) -> None:
    n = len(V4_RATIOS)
    print(f"decode step, batch 1, bf16, FP8 cache; {n} layers (V4: {V4_RATIOS}; dense: window = context)")
    print(f"{'context':>8} {'V4 ms':>8} {'x 1st':>6} {'dense ms':>9} {'x 1st':>6} {'dense/V4':>9}")
    first = None
    for context in contexts:
        v4 = step_ms(narrow_config(V4_RATIOS, 128), context, steps)
        dense = step_ms(narrow_config([0] * n, context + steps + 2), context, steps)
        first = first or (v4, dense)
        print(f"{context:>8} {v4:8.2f} {v4 / first[0]:6.2f} {dense:9.2f} {dense / first[1]:6.2f} {dense / v4:9.2f}",
              flush=True)
    print(f"V4 growth {contexts[0]} -> {contexts[-1]}: {v4 / first[0]:.2f}x (target < 2x) -> "
          f"{'OK' if v4 / first[0] < 2 else 'MISSED'}; dense {dense / first[1]:.2f}x")


def kv_bytes(tokens: int = 1 << 20) -> None:
    print(f"\nKV cache per sequence at {tokens:,} tokens (real cache arrays, jax.eval_shape)")
    print(f"{'model':>6} {'layout':>6} {'GiB':>7} {'B/token':>8} {'V3.2 GiB':>9} {'V4/V3.2':>8} {'smaller':>8}")
    goals = {"flash": 0.07, "pro": 0.10}
    for name in ("flash", "pro"):
        cfg = ModelConfig.from_json(ROOT / f"configs/{name}.json")
        for layout, quantized, v32 in (("fp8", True, V32_FP8), ("bf16", False, V32_BF16)):
            total, base = cache_bytes_per_token(cfg, tokens, quantized) * tokens, V32_LAYERS * v32 * tokens
            print(f"{name:>6} {layout:>6} {total / 2**30:7.2f} {total / tokens:8.1f} {base / 2**30:9.2f} "
                  f"{total / base:8.1%} {base / total:7.1f}x" + (
                      f"   (report: {goals[name]:.0%}, 1/{'13.7' if name == 'flash' else '9.5'})"
                      if layout == "fp8" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--contexts", default="1024,4096,16384,65536")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    if not args.skip_timing:
        timing([int(c) for c in args.contexts.split(",")], args.steps)
    kv_bytes()


if __name__ == "__main__":
    main()
