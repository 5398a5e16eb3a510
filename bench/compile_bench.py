"""Compile time against depth: 4, 16 and 43 layers of a narrow Flash-pattern config.

Layers of one structure are scanned, so a deeper model should cost little more to
compile. Prints seconds per depth and the 43/4 ratio (target: < 2).

    python bench/compile_bench.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model import Transformer

ROOT = Path(__file__).resolve().parents[1]


def narrow_flash(n_layers: int) -> ModelConfig:
    """Tiny widths, Flash's layer schedule (two window-only layers, then CSA/HCA alternating)."""
    raw = json.loads((ROOT / "configs/tiny.json").read_text())
    ratios = ([0, 0] + [4, 128] * n_layers)[:n_layers] + [0]
    raw.update(num_hidden_layers=n_layers, compress_ratios=ratios, num_hash_layers=3)
    return ModelConfig.from_dict(raw, dtype="float32")


def compile_seconds(cfg: ModelConfig, seq: int = 256) -> float:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((1, seq), jnp.int32)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    start = time.perf_counter()
    fn.lower(state, ids).compile()
    return time.perf_counter() - start


def main() -> None:
    times = {}
    for depth in (4, 16, 43):
        cfg = narrow_flash(depth)
        times[depth] = compile_seconds(cfg)
        segments = " + ".join(f"{'/'.join(k.short() for k in s.unit)} x{s.reps}" for s in cfg.layer_plan)
        print(f"{depth:3d} layers: compile {times[depth]:6.2f} s   ({segments})")
    ratio = times[43] / times[4]
    print(f"43-layer / 4-layer compile time: {ratio:.2f}x (target < 2x) -> {'OK' if ratio < 2 else 'MISSED'}")


if __name__ == "__main__":
    main()
