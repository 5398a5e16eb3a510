"""FLOP and byte audit: what XLA compiles against what the config's math needs, as E grows at fixed k.

For narrow two-layer models (one CSA, one HCA layer; float32; no quantisation-aware
simulation, so the program is the matmuls) with E in {8, 64, 256} routed experts and
k = 6, it lowers and compiles
  - a prefill of --prefill tokens,
  - one decode step (batch 1) at --context tokens of context,
  - the gradient of the LM loss over --train tokens (the optimiser update, elementwise
    over the parameters, is not included),
and prints `compiled.cost_analysis()`'s FLOPs (and, for decode, bytes accessed) next
to the analytic minimum computed from the config (attention's loop over query blocks
is unrolled for the count: XLA counts a while loop's body once): every projection a token passes
through (attention, compressors, indexer, mHC mixes, gate, k routed experts + the
shared one, head), attention over the window plus the selected (CSA) or all visible
(HCA) compressed entries, and the indexer's scores over the visible entries. Training
counts 3x the forward. Decode bytes: the weights the step needs (all but the routed
experts, plus k of them per layer, and one embedding row) plus the cache it reads.

The programs are counted with the "tiled" routed matmul: its tile count is static, so XLA's
count is what runs. The "looped" one (XLA:CPU's default) runs a data-dependent loop whose body
XLA counts once; for it the audit prints the rows its chunks multiply for the layer's real
routing, over the assignments.

Then one MoE layer alone at --moe-tokens tokens: counted FLOPs for the tiled matmul and for
`ragged_dot` (as XLA:CPU lowers it), the looped path's executed rows, and the wall time of
both (median of --reps runs, the E's and paths interleaved), which should stay within 1.5x
from E = 8 to E = 256.

    python bench/moe_audit.py [--prefill 2048] [--context 2048] [--train 1024] [--moe-tokens 4096]
                              [--experts 8,64,256] [--reps 7]
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from common import median_seconds
from v4jax import moe
from v4jax.cache import init_cache, n_entries
from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.train import lm_loss

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = (8, 64, 256)
NARROW = dict(hidden_size=256, num_attention_heads=4, head_dim=128, qk_rope_head_dim=64, q_lora_rank=128,
              o_groups=2, o_lora_rank=128, index_n_heads=4, index_head_dim=128, index_topk=64,
              num_experts_per_tok=6, moe_intermediate_size=256, vocab_size=2048, num_hash_layers=0,
              num_nextn_predict_layers=0, num_hidden_layers=2, compress_ratios=[4, 128], sliding_window=128)


def narrow_config(n_experts: int, moe_impl: str | None = "tiled") -> ModelConfig:
    raw = json.loads((ROOT / "configs/tiny.json").read_text())
    raw.update(NARROW, n_routed_experts=n_experts)
    return ModelConfig.from_dict(raw, dtype="float32", quant_sim=False, moe_impl=moe_impl)


def looped_rows(sizes) -> int:
    """Rows the looped path multiplies for experts of `sizes` rows: full chunks, then the narrowest
    chunk covering the rest (moe._each_chunk)."""
    full = moe.CHUNK_ROWS[0]
    return sum(n // full * full + min((w for w in moe.CHUNK_ROWS if w >= n % full), default=0) * (n % full > 0)
               for n in sizes)


# ---------------------------------------------------------------------------- analytic minimum
def token_macs(cfg: ModelConfig, p: int) -> float:
    """Multiply-adds the forward needs for the token at position p (0-based)."""
    d, h, hd, n = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    hi, di, f, w = cfg.index_n_heads, cfg.index_head_dim, cfg.moe_intermediate_size, cfg.sliding_window
    hc_side = (2 + n) * n * n * d + n * d + n * n * d + n * d  # mixes, pre-collapse, post + residual mix
    total = d * cfg.vocab_size + n * n * d + n * d  # head and final collapse
    for layer in range(cfg.num_hidden_layers):
        m = cfg.compress_ratios[layer]
        total += 2 * hc_side
        total += d * cfg.q_lora_rank + cfg.q_lora_rank * h * hd + d * hd + h * hd * cfg.o_lora_rank
        total += cfg.o_groups * cfg.o_lora_rank * d
        keys = min(p + 1, w)
        if m:
            total += 2 * d * (2 if m == 4 else 1) * hd  # compressor wkv, wgate
            visible = (p + 1) // m
            keys += min(cfg.index_topk, visible) if m == 4 else visible
        if m == 4:
            total += cfg.q_lora_rank * hi * di + d * hi + 2 * d * 2 * di  # indexer queries, weights, compressor
            total += visible * (hi * di + hi)  # indexer scores
        total += 2 * h * hd * keys  # q.k and p.v
        total += d * cfg.n_routed_experts + (cfg.num_experts_per_tok + 1) * 3 * d * f
    return total


def analytic_flops(cfg: ModelConfig, start: int, tokens: int) -> float:
    return 2.0 * sum(token_macs(cfg, p) for p in range(start, start + tokens))


def decode_bytes(cfg: ModelConfig, abstract: nnx.Module, context: int) -> float:
    """Weights one decode step needs (k routed experts per layer, one embedding row) + the cache it reads."""
    item = jnp.dtype(cfg.dtype).itemsize
    total = 0.0
    for path, leaf in nnx.to_flat_state(nnx.state(abstract)):
        names = [str(p) for p in path]
        size = leaf.get_value().size * leaf.get_value().dtype.itemsize
        if "experts" in names and "shared_experts" not in names:
            size *= cfg.num_experts_per_tok / cfg.n_routed_experts
        elif names[0] == "embed":
            size = cfg.hidden_size * item
        total += size
    for layer in range(cfg.num_hidden_layers):
        m = cfg.compress_ratios[layer]
        total += cfg.sliding_window * cfg.head_dim * item
        if m == 4:
            n = n_entries(context, m)
            total += n * cfg.index_head_dim * item + min(cfg.index_topk, n) * cfg.head_dim * item
        elif m:
            total += n_entries(context, m) * cfg.head_dim * item
    return total


# ---------------------------------------------------------------------------- compiled programs
def abstract_model(cfg: ModelConfig):
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def _unrolled_map(f, xs, **_):
    """lax.map(f, xs) unrolled, so that every iteration is counted: attention's query blocks (xs, an
    index range) one by one, since each block's indexer switch must stay a conditional (counted as
    its widest branch; vmap would run every branch); anything else (the tiled experts' tiles) as one vmap."""
    if isinstance(xs, jax.Array) and xs.ndim == 1:
        return jax.tree.map(lambda *ys: jnp.stack(ys), *(f(xs[i]) for i in range(xs.shape[0])))
    return jax.vmap(f)(xs)


def cost(fn, *args) -> dict:
    """cost_analysis of fn's compiled program, with every `lax.map` (attention's query blocks, the
    tiled experts' tiles) unrolled: XLA counts a while loop's body once, whatever its trip count."""
    mapped, jax.lax.map = jax.lax.map, _unrolled_map
    try:
        return jax.jit(fn).lower(*args).compile().cost_analysis()
    finally:
        jax.lax.map = mapped


def prefill_cost(cfg, graphdef, state, tokens: int) -> dict:
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    return cost(lambda s, i: nnx.merge(graphdef, s).forward(i)[0], state, ids)


def decode_cost(cfg, graphdef, state, context: int) -> dict:
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, context + 1))
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return cost(lambda s, i, c: nnx.merge(graphdef, s).forward(i, c)[0], state, ids, cache)


def train_cost(cfg, graphdef, state, tokens: int) -> dict:
    ids = jax.ShapeDtypeStruct((1, tokens), jnp.int32)

    def grads(s, i):
        return jax.grad(lambda s: lm_loss(nnx.merge(graphdef, s), i, jnp.ones_like(i))[0])(s)

    return cost(grads, state, ids)


def moe_layer(cfg: ModelConfig, tokens: int):
    """One MoE layer (routing, routed + shared experts) on [1, tokens, dim]: counted FLOPs with the
    tiled matmul and with ragged_dot, the looped path's rows over the assignments, and a call per path."""
    x = jax.random.normal(jax.random.key(1), (1, tokens, cfg.hidden_size), jnp.float32)
    ids = jnp.zeros((1, tokens), jnp.int32)

    def layer(impl, make):
        cfg_run = cfg.replace(moe_impl=impl)
        graphdef, state = nnx.split(make(lambda: moe.MoE(cfg_run, cfg_run.layer_kind(1), nnx.Rngs(0))))
        return (lambda s, x, i: nnx.merge(graphdef, s)(x, i)), state

    ragged, abstract = layer("ragged", nnx.eval_shape)
    tiled, state = layer("tiled", lambda f: f())
    looped, _ = layer("looped", lambda f: f())
    # Counted with the tile loop unrolled (a fresh function: jit caches traces by function).
    counted = cost(lambda *a: tiled(*a), state, x, ids)["flops"]
    same = moe.MoE(cfg, cfg.layer_kind(1), nnx.Rngs(0))  # the layer's weights, for its routing
    routed, _ = same.route(moe.gate_scores(x, same.gate.weight[...]), ids)
    sizes = np.bincount(np.asarray(routed).reshape(-1), minlength=cfg.n_routed_experts)
    calls = {}
    for name, fn in (("tiled", tiled), ("looped", looped)):
        run = jax.jit(fn).lower(state, x, ids).compile()
        jax.block_until_ready(run(state, x, ids))
        calls[name] = functools.partial(lambda run: jax.block_until_ready(run(state, x, ids)), run)
    return counted, cost(ragged, abstract, x, ids)["flops"], looped_rows(sizes) / routed.size, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--train", type=int, default=1024)
    parser.add_argument("--moe-tokens", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--experts", default=",".join(map(str, EXPERTS)))
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}; routed matmul for large batches: "
          f"{moe.MOE_IMPL.get(jax.default_backend(), 'tiled')} (programs counted with: tiled), decode: gather; "
          f"narrow 2-layer model (CSA + HCA), k = {NARROW['num_experts_per_tok']}, float32")
    print(f"{'E':>4} {'program':>18} {'counted GFLOP':>14} {'analytic':>9} {'ratio':>6} "
          f"{'counted MB':>11} {'analytic MB':>12} {'ratio':>6}")
    calls = {}
    experts = [int(e) for e in args.experts.split(",")]
    for e in experts:
        cfg = narrow_config(e)
        abstract = abstract_model(cfg)
        graphdef, state = nnx.split(abstract)
        decode_graphdef, _ = nnx.split(abstract_model(narrow_config(e, None)))  # the backend's choice: gather
        rows = [
            (f"prefill {args.prefill}", prefill_cost(cfg, graphdef, state, args.prefill),
             analytic_flops(cfg, 0, args.prefill), None),
            (f"decode @{args.context}", decode_cost(cfg, decode_graphdef, state, args.context),
             analytic_flops(cfg, args.context, 1), decode_bytes(cfg, abstract, args.context)),
            (f"train {args.train}", train_cost(cfg, graphdef, state, args.train),
             3 * analytic_flops(cfg, 0, args.train), None),
        ]
        for name, c, flops, nbytes in rows:
            line = f"{e:>4} {name:>18} {c['flops'] / 1e9:14.3f} {flops / 1e9:9.3f} {c['flops'] / flops:6.2f}"
            if nbytes:
                line += f" {c['bytes accessed'] / 1e6:11.2f} {nbytes / 1e6:12.2f} {c['bytes accessed'] / nbytes:6.2f}"
            print(line, flush=True)
        counted, counted_ragged, rows, layer_calls = moe_layer(cfg, args.moe_tokens)
        calls.update({(e, name): fn for name, fn in layer_calls.items()})
        d, f, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
        need = 2.0 * args.moe_tokens * (d * e + (k + 1) * 3 * d * f)
        print(f"{e:>4} {'MoE layer ' + str(args.moe_tokens):>18} {counted / 1e9:14.3f} {need / 1e9:9.3f} "
              f"{counted / need:6.2f}   ragged_dot: {counted_ragged / 1e9:.3f} GFLOP ({counted_ragged / need:.1f}x); "
              f"looped: {rows:.2f}x the routed rows", flush=True)
    times = {key: 1e3 * s for key, s in median_seconds(calls, args.reps).items()}
    for name in ("tiled", "looped"):
        first, last = times[(experts[0], name)], times[(experts[-1], name)]
        print(f"MoE layer ({name}) at {args.moe_tokens} tokens, k={k}, median of {args.reps} interleaved runs: "
              + ", ".join(f"E={e} {times[(e, name)]:.0f} ms" for e in experts)
              + f"; E={experts[0]} -> E={experts[-1]}: {last / first:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
