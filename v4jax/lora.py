"""LoRA adapters over a frozen (optionally kept-quantised) base: y = x Wᵀ + (alpha / r) x Aᵀ Bᵀ.

Adapters are `nnx.LoRAParam` variables (Flax NNX's LoRA type), so `wrt=nnx.LoRAParam`
selects exactly them for gradients, the optimiser and adapter-only checkpoints; the base
keeps its `nnx.Param` / `Quantized` variables untouched. Each adapted module gets a
`lora` child (`Adapter`), which its owner reads in one place:

- dense projections (`Linear`, attention / shared expert / indexer): the low-rank term is
  added to the output, on the same (activation-quantised) input the base sees;
- the routed experts (`ExpertWeights`, one pair per expert, stacked [E, ...] and sharded
  with the experts): the pair stays factored (`v4jax.low_rank.LowRank`), so every expert
  path adds each row's x Aᵀ Bᵀ from its own expert's pair and no adapted [E, out, in] stack
  is ever built (PEFT's `target_parameters` folds B A into fused expert weights instead:
  the same function, other round-off);
- the grouped `wo_a` (one pair per group) and the router's `gate` [E, dim]: B A is added
  to the weight before the group / gate matmuls (small weights, used whole).

A is drawn as PEFT draws it (uniform in ±in^-1/2) and B is zero, so a fresh adapter leaves
the model's output exactly unchanged.

Dropout (training only) is PEFT's: the adapter's input is dropped, x -> dropout(x) -> A -> B,
the base sees x. It acts on the dense projections only: PEFT's `target_parameters` (fused
expert weights) refuses dropout, and a term folded into a weight has no input of its own to
drop, so the experts', `wo_a`'s and the gate's adapters train without it, as PEFT's would.
Masks come from keys that `seed_dropout` puts on a traced copy of the model, one per adapter and
per layer (the scanned layers slice them like every stacked variable); the model itself never
holds them, so evaluation and generation run without dropout.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math

import jax
import jax.numpy as jnp
from flax import nnx

from v4jax import quant
from v4jax.attention import GroupedWeight
from v4jax.errors import ConfigError
from v4jax.linear import Linear
from v4jax.low_rank import adapter_term
from v4jax.moe import ExpertWeights, Gate

# Module paths (dotted, from the model root) ending in one of these are adapted by default:
# the attention projections, the shared expert and the routed experts (opt-in: "indexer.*",
# "gate").
DEFAULT_TARGETS = ("attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b",
                   "shared_experts.w1", "shared_experts.w2", "shared_experts.w3",
                   "experts.w1", "experts.w2", "experts.w3")
RANK_AXIS = "lora_rank"  # logical axis of the adapters' rank dim (replicated: rules.py)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0  # on the input of the factored adapters, in training (see the module doc)

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora rank = {self.rank}: must be >= 1")
        if not self.targets:
            raise ConfigError("lora targets: empty; name at least one module pattern")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout = {self.dropout}: must be in [0, 1)")


def low_rank(a, b, scale: float, dtype):
    """a: [..., r, in], b: [..., out, r] -> scale * b @ a: [..., out, in] in dtype (float32 accumulation)."""
    return (scale * jnp.einsum("...or,...ri->...oi", b, a, preferred_element_type=jnp.float32)).astype(dtype)


def dropout(x, rate: float, key):
    """x with each element zeroed with probability `rate` and the rest scaled by 1 / (1 - rate), as
    torch's nn.Dropout (PEFT's lora_dropout)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class DropoutKey(nnx.Variable):
    """The PRNG keys of an adapter's dropout masks [*layers]: set on a traced copy (`seed_dropout`)."""


def dense_matmul(x, w):
    """x: [..., in], w: [out, in] -> x wᵀ: [..., out] float32 (in x's dtype)."""
    return jnp.einsum("...i,oi->...o", x, w.astype(x.dtype), preferred_element_type=jnp.float32)


def low_rank_apply(x, a, b, scale: float):
    """x: [..., in] -> scale * (x aᵀ) bᵀ: [..., out] float32."""
    return adapter_term(dense_matmul, a, b, scale)(x)


class Adapter(nnx.Module):
    """One LoRA pair for a weight [*lead, *stack, out, in]: a [*lead, *stack, r, in], b [*lead, *stack, out, r].

    lead: the scanned-layer dims (unnamed, as for every stacked parameter); stack: the
    experts / groups the weight stacks, named by `stack_axes`, so the adapters shard with them.
    """

    def __init__(self, lead, stack, out_dim: int, in_dim: int, axes, lora: LoRAConfig, dtype, key):
        *stack_axes, out_axis, in_axis = axes
        bound = in_dim**-0.5
        a = jax.random.uniform(key, (*lead, *stack, lora.rank, in_dim), jnp.float32, -bound, bound)
        self.a = nnx.LoRAParam(a.astype(dtype), logical_axes=(*stack_axes, RANK_AXIS, in_axis))
        self.b = nnx.LoRAParam(jnp.zeros((*lead, *stack, out_dim, lora.rank), dtype),
                               logical_axes=(*stack_axes, out_axis, RANK_AXIS))
        self.scale = lora.scale
        self.dropout = lora.dropout

    def delta(self, dtype):
        """scale * B A: [..., out, in]."""
        return low_rank(self.a[...], self.b[...], self.scale, dtype)

    def adapt(self, w):
        """The adapted weight w + scale * B A, in w's dtype."""
        return w + self.delta(w.dtype)

    def __call__(self, x):
        if hasattr(self, "dropout_key"):
            x = dropout(x, self.dropout, self.dropout_key[...])
        return low_rank_apply(x, self.a[...], self.b[...], self.scale)


def _dims(module) -> tuple[tuple[int, ...], int, int]:
    """(leading dims before out, in) of a module's (dequantised) weight, and its out, in."""
    w = module.weight
    if hasattr(module, "scale"):
        shape = jax.eval_shape(lambda c, s: quant.dequant(c, s, jnp.float32), w.get_value(),
                               module.scale.get_value()).shape
    else:
        shape = w.get_value().shape
    return shape[:-2], shape[-2], shape[-1]


def _dtype(module, cfg):
    return jnp.dtype(cfg.dtype) if hasattr(module, "scale") else module.weight.get_value().dtype


def _ends_with(path, pattern: str) -> bool:
    """Whether the last components of a module path match the dotted pattern's, one by one (fnmatch)."""
    parts = pattern.split(".")
    tail = [str(p) for p in path[-len(parts):]]
    return len(path) >= len(parts) and all(fnmatch.fnmatchcase(t, p) for t, p in zip(tail, parts))


def target_modules(model, patterns) -> list[tuple[str, nnx.Module]]:
    """(dotted path, module) of every adaptable module whose path ends in one of `patterns`
    (dotted, each component an fnmatch pattern: "attn.wq_b", "experts.*", "indexer.*", "gate"). A pattern
    that selects nothing, or a module without an adapter hook (the compressors' projections), is a
    ConfigError."""
    chosen, used = [], set()
    for path, module in nnx.iter_modules(model):
        name = ".".join(str(p) for p in path)
        hits = [p for p in patterns if _ends_with(path, p)]
        if not hits or not hasattr(module, "weight"):
            continue
        used.update(hits)
        if not isinstance(module, (Linear, ExpertWeights, GroupedWeight, Gate)) or ".compressor." in f".{name}.":
            raise ConfigError(f"lora target {hits[0]!r}: module {name} has no adapter hook "
                              f"(adaptable: attention, indexer and expert projections, the gate)")
        chosen.append((name, module))
    missing = [p for p in patterns if p not in used]
    if missing:
        raise ConfigError(f"lora target {missing[0]!r}: matches no module of the model")
    return chosen


def apply_lora(model, lora: LoRAConfig, key) -> list[str]:
    """Give every target module a fresh `lora` Adapter (in place); returns the adapted module paths."""
    targets = target_modules(model, lora.targets)
    for (name, module), k in zip(targets, jax.random.split(key, len(targets))):
        module.lora = adapter_for(module, lora, _dtype(module, model.cfg), k)
    return [name for name, _ in targets]


def adapter_for(module, lora: LoRAConfig, dtype, key) -> Adapter:
    """A fresh Adapter shaped for `module`'s weight (its scanned-layer dims, experts or groups); only a
    dense projection's (factored) adapter keeps `lora.dropout`."""
    if not isinstance(module, Linear):
        lora = dataclasses.replace(lora, dropout=0.0)
    dims, out_dim, in_dim = _dims(module)
    axes = module.weight.logical_axes
    n_lead = len(dims) - (len(axes) - 2)  # the dims before the named experts / groups
    return Adapter(dims[:n_lead], dims[n_lead:], out_dim, in_dim, axes, lora, dtype, key)


def adapted_modules(model) -> list[tuple[str, nnx.Module]]:
    return [(".".join(str(p) for p in path), m) for path, m in nnx.iter_modules(model) if hasattr(m, "lora")]


def seed_dropout(model, key) -> None:
    """Give every adapter with dropout its mask keys [*layers] (in place), drawn from `key`: distinct
    per adapter and per scanned layer. For a traced copy of the model inside a training step (see
    the module doc); a fresh key per step and micro-batch gives fresh masks."""
    for i, (_, module) in enumerate(adapted_modules(model)):
        adapter = module.lora
        if adapter.dropout:
            lead = adapter.a.get_value().shape[:-2]  # a dense projection's adapter: [*layers, r, in]
            keys = jax.random.split(jax.random.fold_in(key, i), math.prod(lead)).reshape(lead)
            adapter.dropout_key = DropoutKey(keys)
