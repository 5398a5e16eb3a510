"""Memory plan: per-device parameter, cache and temporary bytes of a sharded forward, never allocated.

Parameters and caches are abstract (`nnx.eval_shape` / `jax.eval_shape`) with their
shardings attached, so their bytes per device are exact sums of shard shapes. The
prefill chunk and the one-token decode step are lowered and compiled for the mesh
(simulated devices are enough) and `compiled.memory_analysis()` gives the
temporaries XLA plans for one device. Layers are scanned, so the temporaries of a
reduced-depth copy of the model (same layer kinds, fewer repetitions) stand for
those of the full depth when compiling the full model is too slow.

LoRA fine-tuning plans (`plan_lora`) do the same for a training step over adapters on a
frozen base: base and adapter (+ moment) bytes at rest, and the compiled step's temporaries
(the training loss of `v4jax.train`, every block rematerialised) for one sequence per
data-parallel replica, its `tensor` devices sharing it. A training step's temporaries do grow
with depth (the backward pass keeps every scan iteration's residual stream), so those of the
full depth are extrapolated from two reduced-depth copies, one more repetition per segment in
the second.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from v4jax.cache import init_cache
from v4jax.config import ModelConfig
from v4jax.lora import LoRAConfig, apply_lora
from v4jax.model import Transformer
from v4jax.placement import shard_cache
from v4jax.sharding.experts import check_expert_layout
from v4jax.sharding.mesh import describe, make_mesh
from v4jax.sharding.placement import bytes_per_device, shard_model
from v4jax.sharding.rules import Layout, ShardingError, get_rules, use_rules
from v4jax.train import lm_loss


@dataclasses.dataclass(frozen=True)
class Step:
    """memory_analysis of one compiled step, bytes per device."""

    arguments: int
    outputs: int
    aliased: int
    temporaries: int


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    model: str
    weights: str  # "quantized" (FP8/FP4 codes + scales) or the dequantised dtype
    mesh: str
    devices: int
    batch: int
    context: int
    chunk: int
    params: int  # bytes per device
    cache: int
    prefill: Step | None
    decode: Step | None
    temp_depth: int  # main layers of the model the temporaries were compiled for

    @property
    def peak(self) -> int:
        """Parameters + cache + the larger step's temporaries (inputs, logits and ids are negligible)."""
        temps = [s.temporaries for s in (self.prefill, self.decode) if s is not None]
        return self.params + self.cache + max(temps, default=0)

    def fits(self, device_bytes: float) -> bool:
        return self.peak <= device_bytes


def reduced_depth(cfg: ModelConfig, reps: int = 2) -> ModelConfig:
    """The same layer kinds with every scan segment cut to at most `reps` repetitions."""
    kinds = [kind for seg in cfg.layer_plan for _ in range(min(seg.reps, reps)) for kind in seg.unit]
    ratios = [k.ratio for k in kinds] + list(cfg.compress_ratios[cfg.num_hidden_layers:])
    return cfg.replace(num_hidden_layers=len(kinds), compress_ratios=tuple(ratios),
                       num_hash_layers=sum(k.hash_routed for k in kinds))


def planned(cfg: ModelConfig) -> ModelConfig:
    """The config as an accelerator runs it: routed experts "tiled" (a GPU's choice) unless set. XLA:CPU
    compiles the plan, and neither its own choice (a data-dependent loop) nor TPU's ragged_dot
    (lowered densely over all experts here) would stand for an accelerator's temporaries."""
    return cfg.replace(moe_impl=cfg.moe_impl or "tiled")


def abstract_model(cfg: ModelConfig) -> nnx.Module:
    return nnx.eval_shape(lambda: Transformer(planned(cfg), rngs=nnx.Rngs(0)))


def at_rest(abstract: nnx.Module, mesh: Mesh, rules, batch: int, context: int) -> tuple[int, int]:
    """Exact bytes per device of the parameters and of a `context`-token cache for `batch` sequences."""
    cfg = abstract.cfg
    params = bytes_per_device(nnx.state(shard_model(nnx.merge(*nnx.split(abstract)), mesh, rules)))
    cache = bytes_per_device(shard_cache(jax.eval_shape(lambda: init_cache(cfg, batch, context)), mesh, rules))
    return params, cache


def compile_step(cfg: ModelConfig, mesh: Mesh, rules, batch: int, context: int, tokens: int,
                 dispatch: str = "gather") -> Step:
    """Lower and compile one forward step of `tokens` tokens into a `context`-token cache; its
    memory_analysis."""
    graphdef, state = nnx.split(shard_model(abstract_model(cfg), mesh, rules))
    cache = shard_cache(jax.eval_shape(lambda: init_cache(cfg, batch, context)), mesh, rules)
    with use_rules(mesh, rules, dispatch=dispatch) as layout:
        ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32,
                                   sharding=layout.sharding(("batch", None), (batch, tokens), "input ids"))
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=layout.sharding(("batch",), (batch,), "lengths"))

        def step(state, ids, cache, lengths):
            logits, _, cache = nnx.merge(graphdef, state).forward(ids, cache, lengths)
            return logits[:, -1], cache

        out_shardings = (NamedSharding(mesh, PartitionSpec()), jax.tree.map(lambda a: a.sharding, cache))
        fn = jax.jit(step, donate_argnums=2, out_shardings=out_shardings)
        mem = fn.lower(state, ids, cache, lengths).compile().memory_analysis()
    return Step(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                mem.temp_size_in_bytes)


def candidate_meshes(cfg: ModelConfig, n_devices: int, devices: Sequence | None = None) -> list[Mesh]:
    """Serving meshes of n devices for one sequence at a time: expert x tensor x sequence = n
    (tensor at most the output-group count)."""
    devices = list(jax.devices()[:n_devices] if devices is None else devices)
    out = []
    for tensor in _divisors(math.gcd(n_devices, cfg.o_groups)):
        for expert in _divisors(n_devices // tensor):
            sequence = n_devices // tensor // expert
            out.append(make_mesh(dict(expert=expert, tensor=tensor, sequence=sequence), devices=devices))
    return out


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def best_mesh(abstract: nnx.Module, n_devices: int, rules, batch: int, context: int,
              devices: Sequence | None = None) -> tuple[Mesh, int, int] | None:
    """The candidate mesh with the fewest parameter + cache bytes per device (ties: the one with
    more expert parallelism, which needs fewer collectives); None if the rules place none."""
    best = None
    rules = get_rules(rules)
    for mesh in candidate_meshes(abstract.cfg, n_devices, devices):
        try:
            cfg = abstract.cfg
            check_expert_layout(Layout(mesh, rules), cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.quant_sim)
            params, cache = at_rest(abstract, mesh, rules, batch, context)
        except ShardingError:
            continue
        key = (params + cache, -mesh.shape["expert"], mesh.shape["sequence"])
        if best is None or key < best[0]:
            best = (key, mesh, params, cache)
    return None if best is None else best[1:]


def plan_memory(cfg: ModelConfig, mesh: Mesh, rules="inference", *, model: str = "", batch: int = 1,
                context: int = 131072, chunk: int = 4096, temp_reps: int | None = None,
                dispatch: str = "gather", compile_steps: bool = True) -> MemoryPlan:
    """Per-device memory of serving `cfg` on `mesh`: weights, a `context`-token cache for `batch`
    sequences, and the temporaries of a `chunk`-token prefill step and a one-token decode step.

    temp_reps: compile a reduced-depth copy with at most that many repetitions per
    scan segment (None: the full model). Raises ShardingError when the rules cannot
    place the model on this mesh.
    """
    rules = get_rules(rules)
    params, cache = at_rest(abstract_model(cfg), mesh, rules, batch, context)
    small = cfg if temp_reps is None else reduced_depth(cfg, temp_reps)
    prefill = decode = None
    if compile_steps:
        prefill = compile_step(small, mesh, rules, batch, context, min(chunk, context), dispatch)
        decode = compile_step(small, mesh, rules, batch, context, 1, dispatch)
    weights = "quantized" if cfg.quantized else cfg.dtype
    return MemoryPlan(model or "model", weights, describe(mesh), mesh.size, batch, context, chunk, params, cache,
                      prefill, decode, small.num_hidden_layers)


def smallest_fit(cfg: ModelConfig, capacities: Sequence[float], sizes: Sequence[int], rules="inference", *,
                 model: str = "", batch: int = 1, context: int = 131072, chunk: int = 4096,
                 temp_reps: int | None = None,
                 on_plan: Callable[[MemoryPlan], None] | None = None) -> dict[float, MemoryPlan | None]:
    """For each device capacity (bytes), the plan of the smallest device count in `sizes` whose best
    mesh holds parameters + cache + temporaries. Compiles only where parameters + cache fit;
    on_plan(plan) is called with each plan as it is compiled (they take minutes on a full model)."""
    rules = get_rules(rules)
    abstract = abstract_model(cfg)
    left = sorted(capacities)[::-1]  # largest capacity fits first
    found: dict[float, MemoryPlan | None] = dict.fromkeys(capacities)
    for n in sorted(sizes):
        if not left:
            break
        best = best_mesh(abstract, n, rules, batch, context)
        if best is None or best[1] + best[2] > left[0]:
            continue
        plan = plan_memory(cfg, best[0], rules, model=model, batch=batch, context=context, chunk=chunk,
                           temp_reps=temp_reps)
        if on_plan is not None:
            on_plan(plan)
        while left and plan.fits(left[0]):
            found[left.pop(0)] = plan
    return found


def table(columns: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: the header, then one line per row of cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in rows])


def _gb(n_bytes: float | None) -> str:
    """GB (1e9 bytes) to one decimal; "-" for what was not measured."""
    return "-" if n_bytes is None else f"{n_bytes / 1e9:.1f}"


def format_plans(plans: Sequence[MemoryPlan]) -> str:
    """A markdown table of plans (GB = 1e9 bytes)."""
    temp = lambda s: _gb(s.temporaries if s else None)
    return table(("model", "weights", "context", "devices", "mesh", "params GB", "cache GB", "prefill temp GB",
                  "decode temp GB", "peak GB"),
                 [(p.model, p.weights, _tokens(p.context), p.devices, p.mesh, _gb(p.params), _gb(p.cache),
                   temp(p.prefill), temp(p.decode), _gb(p.peak)) for p in plans])


def format_fits(fits, capacities_gb: Sequence[float]) -> str:
    """fits: (model, weights, context label, {capacity bytes: plan or None}) -> a markdown table of the
    smallest fitting device count (and its mesh, peak GB) per device size."""
    def cell(p) -> str:
        return "none of the sizes tried" if p is None else f"{p.devices} ({p.mesh}; peak {p.peak / 1e9:.0f})"

    return table(("model", "weights", "context", *(f"{gb:g} GB devices" for gb in capacities_gb)),
                 [(model, weights, context, *(cell(found.get(gb * 1e9)) for gb in capacities_gb))
                  for model, weights, context, found in fits])


def _tokens(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}K" if n % 1024 == 0 else str(n)


def to_json(plans: Sequence[MemoryPlan]) -> str:
    return json.dumps([dataclasses.asdict(p) | {"peak": p.peak} for p in plans], indent=1)


# ---------------------------------------------------------------------------- LoRA fine-tuning
@dataclasses.dataclass(frozen=True)
class LoRAPlan:
    """Per-device memory of a LoRA step (v4jax.lora) over a frozen base, training rules."""

    model: str
    weights: str
    mesh: str
    devices: int
    rank: int
    tokens: int  # per sequence; one sequence per data-parallel replica (its `tensor` devices share it)
    params: int  # the frozen base, bytes per device
    adapters: int  # adapters + AdamW's two moments (same dtype and sharding), bytes per device
    step: Step | None  # the compiled step (rematerialised blocks): temporaries = activations, gradients
    temp_depths: tuple[int, ...]  # main layers of the copies compiled (two: extrapolated to the full depth)

    @property
    def peak(self) -> int:
        return self.params + self.adapters + (self.step.temporaries if self.step else 0)

    def fits(self, device_bytes: float) -> bool:
        return self.peak <= device_bytes


def lora_abstract(cfg: ModelConfig, rank: int) -> nnx.Module:
    """The abstract model with LoRA adapters of `rank` on the default targets."""
    def build():
        model = Transformer(planned(cfg), rngs=nnx.Rngs(0))
        apply_lora(model, LoRAConfig(rank), jax.random.key(0))
        return model

    return nnx.eval_shape(build)


def lora_at_rest(abstract: nnx.Module, mesh: Mesh) -> tuple[int, int]:
    """(base bytes, adapter + moment bytes) per device under the training rules."""
    state = nnx.state(shard_model(nnx.merge(*nnx.split(abstract)), mesh, "training"))
    adapters = bytes_per_device(nnx.filter_state(state, nnx.LoRAParam))
    return bytes_per_device(state) - adapters, 3 * adapters


def compile_train_step(cfg: ModelConfig, mesh: Mesh, tokens: int, rank: int | None, dispatch: str = "gather") -> Step:
    """Lower and compile one training step (next-token NLL of one `tokens`-token sequence per device,
    its gradient, an AdamW update of the trained leaves and their two moments, every block
    rematerialised); its memory_analysis. rank: LoRA adapters of that rank are trained over the
    frozen base; None: every nnx.Param (full fine-tuning)."""
    cfg = cfg.replace(remat=True)
    abstract = abstract_model(cfg) if rank is None else lora_abstract(cfg, rank)
    trained = nnx.Param if rank is None else nnx.LoRAParam
    graphdef, params, base = nnx.split(shard_model(abstract, mesh, "training"), trained, ...)
    batch = mesh.size // mesh.shape.get("tensor", 1)  # tensor-parallel devices share their sequence
    with use_rules(mesh, "training", dispatch=dispatch) as layout:
        ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32,
                                   sharding=layout.sharding(("batch", None), (batch, tokens), "input ids"))

        def loss(params, base, ids):  # the training loss (v4jax.train), every token a target
            return lm_loss(nnx.merge(graphdef, params, base), ids, jnp.ones_like(ids))[0]

        def step(params, mu, nu, base, ids):
            g = jax.grad(loss)(params, base, ids)
            mu = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, mu, g)
            nu = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, nu, g)
            params = jax.tree.map(lambda p, m, v: p - 1e-4 * (m / (jnp.sqrt(v) + 1e-8) + 0.1 * p), params, mu, nu)
            return params, mu, nu

        fn = jax.jit(step, donate_argnums=(0, 1, 2))
        mem = fn.lower(params, params, params, base, ids).compile().memory_analysis()
    return Step(mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.alias_size_in_bytes,
                mem.temp_size_in_bytes)


def scan_steps(cfg: ModelConfig) -> int:
    """Scan iterations over the main layers: one per repetition of each segment's unit."""
    return sum(seg.reps for seg in cfg.layer_plan)


def extrapolated_train_step(cfg: ModelConfig, mesh: Mesh, tokens: int, rank: int | None, reps: int = 1,
                            ) -> tuple[Step, tuple[int, ...]]:
    """`compile_train_step` of the full depth from copies with at most `reps` and `reps` + 1 repetitions
    per segment: each byte count taken as affine in the scan iterations (each keeps one residual
    stream for the backward pass, the same shape in every segment). Where the copies' own layer
    plans give both as many iterations (units cut differently), the layer count stands in for
    them. Where the deeper copy needs fewer bytes than the shallower one, the two were scheduled
    differently (XLA inlines a segment of one repetition; Flash at reps = 1: 189 GB of temporaries,
    120 GB at reps = 2) and no line through them holds: the full depth is compiled instead. Also
    the depths compiled."""
    lo, hi = reduced_depth(cfg, reps), reduced_depth(cfg, reps + 1)
    step_lo = compile_train_step(lo, mesh, tokens, rank)
    if lo.num_hidden_layers == cfg.num_hidden_layers:  # no segment repeats more than `reps` times
        return step_lo, (lo.num_hidden_layers,)
    step_hi = compile_train_step(hi, mesh, tokens, rank)
    if any(b < a for a, b in zip(dataclasses.astuple(step_lo), dataclasses.astuple(step_hi))):
        return compile_train_step(cfg, mesh, tokens, rank), (cfg.num_hidden_layers,)
    size = scan_steps if scan_steps(hi) != scan_steps(lo) else (lambda c: c.num_hidden_layers)
    f = (size(cfg) - size(lo)) / (size(hi) - size(lo))
    step = Step(*(round(a + (b - a) * f) for a, b in zip(dataclasses.astuple(step_lo), dataclasses.astuple(step_hi))))
    return step, (lo.num_hidden_layers, hi.num_hidden_layers)


def training_meshes(cfg: ModelConfig, n_devices: int, tensor: int = 1, devices: Sequence | None = None) -> list[Mesh]:
    """fsdp x expert x tensor = n (expert dividing the routed-expert count, the given tensor
    degree): the LoRA step's candidates; none where tensor does not divide n."""
    devices = list(jax.devices()[:n_devices] if devices is None else devices)
    if n_devices % tensor:
        return []
    rest = n_devices // tensor
    return [make_mesh(dict(fsdp=rest // e, expert=e, tensor=tensor), devices=devices)
            for e in _divisors(rest) if cfg.n_routed_experts % e == 0]


def plan_lora(cfg: ModelConfig, n_devices: int, rank: int, tokens: int, *, model: str = "", tensor: int = 1,
              temp_reps: int | None = None, compile_steps: bool = True) -> LoRAPlan | None:
    """The LoRA plan on the `n_devices` training mesh (`tensor` devices per sequence) with the fewest
    base + adapter bytes per device (ties: more expert parallelism); None if the training rules place
    the model on none. temp_reps: the step's bytes extrapolated from copies of at most that many and
    one more repetitions per segment (`extrapolated_train_step`); None: the full model compiled."""
    abstract = lora_abstract(cfg, rank)
    best = None
    for mesh in training_meshes(cfg, n_devices, tensor):
        try:
            check_expert_layout(Layout(mesh, get_rules("training")), cfg.n_routed_experts,
                                cfg.moe_intermediate_size, cfg.quant_sim)
            params, adapters = lora_at_rest(abstract, mesh)
        except ShardingError:
            continue
        key = (params + adapters, -mesh.shape["expert"])
        if best is None or key < best[0]:
            best = (key, mesh, params, adapters)
    if best is None:
        return None
    _, mesh, params, adapters = best
    step, depths = None, ()
    if compile_steps and temp_reps is None:
        step, depths = compile_train_step(cfg, mesh, tokens, rank), (cfg.num_hidden_layers,)
    elif compile_steps:
        step, depths = extrapolated_train_step(cfg, mesh, tokens, rank, temp_reps)
    weights = "quantized" if cfg.quantized else cfg.dtype
    return LoRAPlan(model or "model", weights, describe(mesh), mesh.size, rank, tokens, params, adapters, step,
                    depths)


def smallest_lora_fit(cfg: ModelConfig, capacity: float, sizes: Sequence[int], rank: int, tokens: int, *,
                      model: str = "", tensor: int = 1, temp_reps: int | None = None) -> LoRAPlan | None:
    """The plan of the smallest device count in `sizes` whose LoRA step fits `capacity` bytes per device
    (compiled only where base + adapters fit)."""
    for n in sorted(sizes):
        at_rest_only = plan_lora(cfg, n, rank, tokens, model=model, tensor=tensor, compile_steps=False)
        if at_rest_only is None or at_rest_only.peak > capacity:
            continue
        plan = plan_lora(cfg, n, rank, tokens, model=model, tensor=tensor, temp_reps=temp_reps)
        if plan.fits(capacity):
            return plan
    return None


def format_lora_plans(plans: Sequence[LoRAPlan]) -> str:
    """A markdown table of LoRA plans (GB = 1e9 bytes)."""
    return table(("model", "base", "rank", "tokens/seq", "devices", "mesh", "base GB", "adapters+AdamW GB",
                  "step temp GB", "peak GB"),
                 [(p.model, p.weights, p.rank, _tokens(p.tokens), p.devices, p.mesh, _gb(p.params), _gb(p.adapters),
                   _gb(p.step.temporaries if p.step else None), _gb(p.peak)) for p in plans])
