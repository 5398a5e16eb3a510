"""The published tensor inventory, derived from the config alone (spec §3.2, §3.3).

This is the one place that knows which tensors a DeepSeek-V4 checkpoint holds: their
names, safetensors dtypes, shapes and published order. The checkpoint reader, the
converter, the exporter and the random-checkpoint writer all derive from it. The
order is the one of the published `model.safetensors.index.json`: `embed`, then each
layer, then the final `hc_head_*`, `norm` and `head`, then the MTP block.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from typing import NamedTuple

from v4jax.config import ModelConfig

# Bytes per element of each safetensors dtype the published checkpoints use.
ITEMSIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "I64": 8}


class TensorSpec(NamedTuple):
    name: str
    dtype: str  # safetensors dtype string
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def fp8_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """One scale per 128 x 128 block of an [out, in] FP8 weight (spec §3.4)."""
    return (-(-shape[0] // 128), -(-shape[1] // 128))


def published_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every tensor of the published checkpoint for `cfg`, in published order."""
    specs = [TensorSpec("embed.weight", "BF16", (cfg.vocab_size, cfg.hidden_size))]
    for i in range(cfg.num_hidden_layers):
        specs += _block(cfg, f"layers.{i}.", i)
    specs += _hc_head(cfg, "")
    specs += [TensorSpec("norm.weight", "BF16", (cfg.hidden_size,)),
              TensorSpec("head.weight", "BF16", (cfg.vocab_size, cfg.hidden_size))]
    if cfg.num_nextn_predict_layers:
        p, d = "mtp.0.", cfg.hidden_size
        specs += _hc_head(cfg, p) + _block(cfg, p, cfg.num_hidden_layers)
        specs += _fp8(cfg, p + "e_proj", (d, d)) + _fp8(cfg, p + "h_proj", (d, d))
        specs += [TensorSpec(p + n, "BF16", (d,)) for n in ("enorm.weight", "hnorm.weight", "norm.weight")]
    return specs


def config_keys_of(cfg: ModelConfig, name: str, axis: int) -> list[str]:
    """The config keys that size `axis` of tensor `name` (each is doubled in turn and the
    inventory recomputed), to point at the key of a config that disagrees with the weights."""
    shape = {s.name: s.shape for s in published_tensors(cfg)}[name]
    keys = []
    for key in ("vocab_size", "hidden_size", "num_attention_heads", "head_dim", "qk_rope_head_dim", "q_lora_rank",
                "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "n_routed_experts",
                "num_experts_per_tok", "moe_intermediate_size", "hc_mult"):
        changed = {s.name: s.shape for s in published_tensors(dataclasses.replace(cfg, **{key: 2 * getattr(cfg, key)}))}
        if name in changed and len(changed[name]) == len(shape) and changed[name][axis] != shape[axis]:
            keys.append(key)
    return keys


def dtype_histogram(specs: list[TensorSpec]) -> dict[str, int]:
    return dict(Counter(s.dtype for s in specs))


def total_bytes(specs: list[TensorSpec]) -> int:
    """The index's `metadata.total_size` (spec §3.8)."""
    return sum(s.nbytes for s in specs)


def _fp8(cfg: ModelConfig, prefix: str, shape: tuple[int, int]) -> list[TensorSpec]:
    return [TensorSpec(prefix + ".weight", "F8_E4M3", shape),
            TensorSpec(prefix + ".scale", cfg.scale_dtype, fp8_scale_shape(shape))]


def _expert(cfg: ModelConfig, prefix: str, shape: tuple[int, int]) -> list[TensorSpec]:
    if cfg.expert_dtype == "fp8":  # Base checkpoints
        return _fp8(cfg, prefix, shape)
    out, inp = shape  # two E2M1 codes per byte, one E8M0 scale per 32 inputs (spec §3.5)
    return [TensorSpec(prefix + ".weight", "I8", (out, inp // 2)),
            TensorSpec(prefix + ".scale", "F8_E8M0", (out, inp // 32))]


def _hc_head(cfg: ModelConfig, p: str) -> list[TensorSpec]:
    n = cfg.hc_mult
    return [TensorSpec(p + "hc_head_base", "F32", (n,)),
            TensorSpec(p + "hc_head_fn", "F32", (n, n * cfg.hidden_size)),
            TensorSpec(p + "hc_head_scale", "F32", (1,))]


def _block(cfg: ModelConfig, p: str, layer: int) -> list[TensorSpec]:
    """One decoder block (`layers.{i}.` or `mtp.0.`), in the published order."""
    kind = cfg.layer_kind(layer)
    d, h, hd, n = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
    q, g, r = cfg.q_lora_rank, cfg.o_groups, cfg.o_lora_rank
    e, f = cfg.n_routed_experts, cfg.moe_intermediate_size
    rows = (2 + n) * n  # mHC mixer: pre, post and the n x n residual matrix
    specs = [TensorSpec(p + "hc_attn_base", "F32", (rows,)),
             TensorSpec(p + "hc_ffn_base", "F32", (rows,)),
             TensorSpec(p + "hc_attn_fn", "F32", (rows, n * d)),
             TensorSpec(p + "hc_attn_scale", "F32", (3,)),
             TensorSpec(p + "hc_ffn_fn", "F32", (rows, n * d)),
             TensorSpec(p + "hc_ffn_scale", "F32", (3,)),
             TensorSpec(p + "attn.attn_sink", "F32", (h,))]
    specs += _fp8(cfg, p + "attn.wq_a", (q, d)) + _fp8(cfg, p + "attn.wq_b", (h * hd, q))
    specs += [TensorSpec(p + "attn.q_norm.weight", "BF16", (q,))]
    specs += _fp8(cfg, p + "attn.wo_a", (g * r, h * hd // g)) + _fp8(cfg, p + "attn.wkv", (hd, d))
    specs += [TensorSpec(p + "attn.kv_norm.weight", "BF16", (hd,))]
    if kind.ratio:
        specs += _compressor(p + "attn.compressor.", kind.ratio, (2 if kind.overlap else 1) * hd, hd, d)
    if kind.has_indexer:
        ih, idim = cfg.index_n_heads, cfg.index_head_dim
        specs += _fp8(cfg, p + "attn.indexer.wq_b", (ih * idim, q))
        specs += _compressor(p + "attn.indexer.compressor.", kind.ratio, 2 * idim, idim, d)
        specs += [TensorSpec(p + "attn.indexer.weights_proj.weight", "BF16", (ih, d))]
    specs += _fp8(cfg, p + "attn.wo_b", (d, g * r))
    specs += [TensorSpec(p + "attn_norm.weight", "BF16", (d,)), TensorSpec(p + "ffn_norm.weight", "BF16", (d,))]
    for w, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f))):
        specs += _fp8(cfg, p + f"ffn.shared_experts.{w}", shape)
    for j in range(e):
        specs += _expert(cfg, p + f"ffn.experts.{j}.w1", (f, d)) + _expert(cfg, p + f"ffn.experts.{j}.w3", (f, d))
    for j in range(e):
        specs += _expert(cfg, p + f"ffn.experts.{j}.w2", (d, f))
    if kind.hash_routed:
        specs += [TensorSpec(p + "ffn.gate.tid2eid", "I64", (cfg.vocab_size, cfg.num_experts_per_tok))]
    else:
        specs += [TensorSpec(p + "ffn.gate.bias", "F32", (e,))]
    specs += [TensorSpec(p + "ffn.gate.weight", "BF16", (e, d))]
    return specs


def _compressor(p: str, ratio: int, width: int, head_dim: int, dim: int) -> list[TensorSpec]:
    return [TensorSpec(p + "ape", "F32", (ratio, width)),
            TensorSpec(p + "wkv.weight", "BF16", (width, dim)),
            TensorSpec(p + "wgate.weight", "BF16", (width, dim)),
            TensorSpec(p + "norm.weight", "BF16", (head_dim,))]
