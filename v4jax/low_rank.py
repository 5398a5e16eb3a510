"""A routed-expert weight stack with one LoRA pair per expert, kept factored.

The matmul of rows x with expert e is x W_eᵀ + scale (x A_eᵀ) B_eᵀ: the adapted matrix
W_e + scale B_e A_e is never formed. Folded, an adapter makes every layer build (and its
backward pass keep, and differentiate in float32) dense [E, out, in] copies of the stack
per projection: 44 of the 136 GB of temporaries per device of a Flash LoRA step at 8K tokens
(v4jax plan's copy with two layers per segment, 16 devices). Factored, the extra work is two
rank-r matmuls per row and the gradients are [E, r, in] and [E, out, r].

v4jax.moe's expert paths take this as one more kind of operand, next to a plain stack
and kept-quantised (codes, scales); the expert-parallel dispatch splits it with `partition`.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import PartitionSpec


@dataclasses.dataclass(frozen=True)
class LowRank:
    w: object  # the frozen base: [E, out, in], or kept-quantised (codes, scales)
    a: jax.Array  # [E, r, in]
    b: jax.Array  # [E, out, r]
    scale: float  # LoRA's alpha / r (static)

    def partition(self, spec: PartitionSpec) -> LowRank:
        """shard_map specs from the base's (experts, out, in) spec: the rank dim is never split."""
        experts, out, inp = spec
        return LowRank(jax.tree.map(lambda _: spec, self.w), PartitionSpec(experts, None, inp),
                       PartitionSpec(experts, out, None), self.scale)


jax.tree_util.register_dataclass(LowRank, data_fields=("w", "a", "b"), meta_fields=("scale",))


def adapter_term(matmul, a, b, scale: float):
    """rows x -> scale (x aᵀ) bᵀ float32, where matmul(x, m) -> x mᵀ float32 is the caller's layout
    (dense rows, one expert's rows, ragged groups). The rank-r hidden is rounded to x's dtype, as
    in PEFT's adapters."""
    return lambda x: scale * matmul(matmul(x, a).astype(x.dtype), b)


def times(matmul, w):
    """rows x -> x wᵀ float32 for a matrix (or a stack matmul takes) w; for a LowRank, the base's
    product plus its adapter_term."""
    if isinstance(w, LowRank):
        base, term = times(matmul, w.w), adapter_term(matmul, w.a, w.b, w.scale)
        return lambda x: base(x) + term(x)
    return lambda x: matmul(x, w)
