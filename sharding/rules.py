"""Logical axis names -> mesh axes: the rule sets as tables, the resolver and the active layout.

The model names every dim of every parameter (`logical_axes` metadata, v4jax/params.py),
activation (`constrain` calls) and cache array (v4jax/cache.py `CACHE_AXES`). A rule
set maps each name to nothing (replicated), one mesh axis or a tuple of mesh axes.
Changing the mesh shape or the rule set needs no model change.

The resolver never drops a rule silently: it raises `ShardingError`, naming the
tensor, when a name has no rule, when one mesh axis would split two dims of one
tensor, or when a dim does not divide by the size of its mesh axes. Mesh axes a
mesh does not have, or has with size 1, leave their dims whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from v4jax.errors import ShardingError

MeshAxes = None | str | tuple[str, ...]

# Serving: experts over expert (and over data, so DP-attention replicas share one
# copy of the experts), heads / output groups / FFN widths / vocabulary over tensor,
# KV caches over batch (data) and, for long contexts, over compressed entries (sequence).
INFERENCE: dict[str, MeshAxes] = {
    # parameters
    "vocab": "tensor",
    "embed": None,
    "q_lora": None,
    "heads": "tensor",
    "kv": None,
    "o_groups": "tensor",
    "o_lora": None,
    "index_heads": "tensor",
    "exp": ("data", "expert"),
    "mlp_moe": "tensor",
    "embed_moe": None,
    "mlp": "tensor",
    "layers": None,
    "lora_rank": None,
    # activations
    "batch": "data",
    "seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_vocab": "tensor",
    # decode cache
    "cache_batch": "data",
    "cache_seq": "sequence",
    "cache_kv": None,
}

# Training: FSDP (every large matrix has one dim over fsdp, gathered before use;
# the batch runs over data, fsdp and expert) plus expert parallelism (tokens of
# every device reach the expert shards and come back, see experts.py) and tensor
# parallelism over heads / groups / FFN widths.
TRAINING: dict[str, MeshAxes] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "q_lora": None,
    "heads": ("tensor", "fsdp"),
    "kv": None,
    "o_groups": "tensor",
    "o_lora": "fsdp",
    "index_heads": "tensor",
    "exp": "expert",
    "mlp_moe": "tensor",
    "embed_moe": "fsdp",
    "mlp": "tensor",
    "layers": None,
    "lora_rank": None,
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": None,
    "act_embed": "tensor",
    "act_heads": "tensor",
    "act_vocab": "tensor",
    # decode cache (evaluation and generation with a training layout)
    "cache_batch": ("data", "fsdp", "expert"),
    "cache_seq": None,
    "cache_kv": None,
}

RULE_SETS: dict[str, dict[str, MeshAxes]] = {"inference": INFERENCE, "training": TRAINING}
DISPATCH = ("gather", "a2a", "ragged")


def get_rules(rules: str | Mapping[str, MeshAxes]) -> Mapping[str, MeshAxes]:
    """A rule table by name ("inference", "training") or as given, checked for well-formed values."""
    if isinstance(rules, str):
        if rules not in RULE_SETS:
            raise ShardingError(f"unknown rule set {rules!r} (known: {', '.join(RULE_SETS)})")
        return RULE_SETS[rules]
    for name, value in rules.items():
        ok = value is None or isinstance(value, str) or (
            isinstance(value, tuple) and all(isinstance(a, str) for a in value))
        if not ok:
            raise ShardingError(f"rule {name!r} -> {value!r}: expected None, a mesh axis or a tuple of mesh axes")
    return rules


def rule_axes(rules: Mapping[str, MeshAxes], name: str, what: str) -> tuple[str, ...]:
    """The mesh axes one logical name maps to (as written in the table)."""
    if name not in rules:
        raise ShardingError(f"{what}: logical axis {name!r} has no rule in the rule set")
    value = rules[name]
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Mapping[str, MeshAxes], what: str = "tensor") -> PartitionSpec:
    """Logical axes of one array (one name or None per dim) -> its PartitionSpec on `mesh`.

    Raises ShardingError naming `what` on a missing rule, a mesh axis used by two
    dims, or a dim that does not divide by the product of its mesh axes' sizes.
    """
    if len(axes) != len(shape):
        raise ShardingError(f"{what}: logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    used: dict[str, int] = {}
    spec = []
    for dim, (name, size) in enumerate(zip(axes, shape)):
        mesh_axes = () if name is None else rule_axes(rules, name, what)
        for a in mesh_axes:
            if a in used:
                raise ShardingError(f"{what}: mesh axis {a!r} would split both dim {used[a]} ({axes[used[a]]!r}) "
                                    f"and dim {dim} ({name!r})")
            used[a] = dim
        live = tuple(a for a in mesh_axes if mesh.shape.get(a, 1) > 1)
        parts = math.prod(mesh.shape[a] for a in live)
        if size % parts:
            raise ShardingError(f"{what}: dim {dim} ({name!r}) of size {size} does not divide by mesh axes "
                                f"{live} of size {parts} (shape {tuple(shape)})")
        spec.append(None if not live else live[0] if len(live) == 1 else live)
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh, a rule set and the expert-dispatch backend: everything placement depends on.

    Hashable (the rule table is compared by its items), because the active Layout is
    part of every jit cache key (see `use_rules`).
    """

    mesh: Mesh
    rules: Mapping[str, MeshAxes] = dataclasses.field(hash=False, compare=False)
    dispatch: str = "gather"
    capacity_factor: float | None = None
    _rules_key: tuple = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        if self.dispatch not in DISPATCH:
            raise ShardingError(f"unknown expert dispatch {self.dispatch!r} (known: {', '.join(DISPATCH)})")
        object.__setattr__(self, "_rules_key", tuple(sorted(self.rules.items())))

    def spec(self, axes, shape, what: str = "tensor") -> PartitionSpec:
        return logical_to_spec(axes, shape, self.mesh, self.rules, what)

    def sharding(self, axes, shape, what: str = "tensor") -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape, what))

    def live_axes(self, name: str) -> tuple[str, ...]:
        """Mesh axes of size > 1 that one logical name maps to."""
        return tuple(a for a in rule_axes(self.rules, name, name) if self.mesh.shape.get(a, 1) > 1)

    def size(self, mesh_axes: Sequence[str]) -> int:
        return math.prod(self.mesh.shape[a] for a in mesh_axes)


# A jit-keyed context (not a plain context variable): a function jitted once and called under
# two layouts is traced and compiled once per layout instead of reusing the first placement.
_ACTIVE = jax.make_user_context(None)


def active_rules() -> Layout | None:
    """The Layout while `use_rules` is active, else None."""
    return _ACTIVE.value


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: str | Mapping[str, MeshAxes], *, dispatch: str = "gather",
              capacity_factor: float | None = None):
    """Trace the model under a mesh and rule set: activations are constrained, experts dispatched.

    Placement is decided when a function is traced; the active Layout (mesh, rule table,
    dispatch) is part of jit's cache key, so one jitted function serves several layouts,
    each with its own compiled program. `dispatch`: "gather" (default; tokens gathered to
    the expert shards, results psum-scattered), "a2a" (dense all_to_all with
    `capacity_factor`, None = never drop) or "ragged" (ragged_all_to_all; TPU/GPU only).
    See experts.py.
    """
    layout = Layout(mesh, get_rules(rules), dispatch, capacity_factor)
    with _ACTIVE(layout), jax.set_mesh(mesh):
        yield layout


def constrain(x, axes: Sequence[str | None]):
    """with_sharding_constraint by logical axes; identity when no rules are active."""
    layout = _ACTIVE.value
    if layout is None:
        return x
    what = f"activation {tuple(axes)} {x.dtype}{list(x.shape)}"
    return jax.lax.with_sharding_constraint(x, layout.sharding(axes, x.shape, what))
