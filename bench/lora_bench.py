"""LoRA on a quantised base vs full fine-tuning in bf16: peak device memory of one training step
(compiled memory analysis of both programs, same run, same narrow config, one device, remat), and
the loss of a tiny model falling under adapters alone.

    .venv/bin/python bench/lora_bench.py [--tokens 1024] [--rank 16] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# As `v4jax plan`: XLA:CPU would hoist whole-stack dtype conversions out of the layer loop, a
# CPU-only temporary that would dominate both programs.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_disable_hlo_passes=while-loop-invariant-code-motion"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from common import bench_config  # noqa: E402
from v4jax import lora, train  # noqa: E402
from v4jax.config import ModelConfig  # noqa: E402
from v4jax.memory_plan import compile_train_step  # noqa: E402
from v4jax.model import Transformer  # noqa: E402
from v4jax.optim import OptimizerConfig  # noqa: E402
from v4jax.sharding import make_mesh  # noqa: E402


def peak(step) -> int:
    """Arguments + outputs not aliased to them + temporaries: what the step holds at once."""
    return step.arguments + step.outputs - step.aliased + step.temporaries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    mesh = make_mesh("", devices=jax.devices()[:1])
    cfg = bench_config()
    lora_step = compile_train_step(cfg.replace(quantized=True), mesh, args.tokens, args.rank)
    full_step = compile_train_step(cfg.replace(quantized=False, dtype="bfloat16"), mesh, args.tokens, None)
    gib = lambda b: f"{b / 2**30:.3f} GiB"
    print(f"narrow config ({cfg.num_hidden_layers} layers, dim {cfg.hidden_size}, {cfg.n_routed_experts} experts), "
          f"{args.tokens} tokens, one device ({jax.default_backend()}), remat")
    for name, s in (("LoRA r=%d, FP8/FP4 base" % args.rank, lora_step), ("full fine-tuning, bf16", full_step)):
        print(f"  {name:28s} peak {gib(peak(s))}  (arguments {gib(s.arguments)}, temporaries {gib(s.temporaries)})")
    print(f"  ratio full / LoRA: {peak(full_step) / peak(lora_step):.2f}x")

    tiny = ModelConfig.from_json(Path(__file__).resolve().parents[1] / "configs/tiny.json", quantized=True)
    model = Transformer(tiny, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoRAConfig(8, 16.0), jax.random.key(0))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (4, 64), 0, tiny.vocab_size))
    opt = train.make_optimizer(model, OptimizerConfig(learning_rate=3e-3, total_steps=args.steps),
                               wrt=nnx.LoRAParam)
    losses = [float(train.train_step(model, opt, ids, np.ones_like(ids), wrt=nnx.LoRAParam)["loss"])
              for _ in range(args.steps)]
    marks = sorted({0, args.steps // 3, 2 * args.steps // 3, args.steps - 1})
    print("tiny model, FP8/FP4 base frozen, adapters only (one fixed batch): loss "
          + ", ".join(f"step {i + 1} {losses[i]:.3f}" for i in marks))


if __name__ == "__main__":
    main()
