"""Placement policy for v4jax: mesh, logical-axis rules, expert and KV-sequence parallelism.

Installed as `v4jax.sharding`. The model only names logical axes; this package
maps them to mesh axes. With no active rules every call the model makes into it
is a no-op, so the same model code runs on one device unchanged.

    mesh = make_mesh("data=2,expert=4")
    model = v4jax.placement.create_sharded_model(cfg, mesh, "inference")   # born sharded
    with use_rules(mesh, "inference"):
        logits = jax.jit(lambda m, ids: m(ids))(model, ids)
"""

from v4jax.sharding.experts import expert_dispatch
from v4jax.sharding.kv import top_k
from v4jax.sharding.mesh import AXES, MeshError, describe, make_mesh, parse_mesh_spec, simulate_cpu_devices
from v4jax.sharding.placement import (
    bytes_per_device,
    fetch,
    param_axes,
    place,
    shard_model,
    state_shardings,
    tree_shardings,
)
from v4jax.sharding.rules import (
    INFERENCE,
    RULE_SETS,
    TRAINING,
    Layout,
    ShardingError,
    active_rules,
    constrain,
    get_rules,
    logical_to_spec,
    use_rules,
)

__all__ = [
    "AXES", "INFERENCE", "RULE_SETS", "TRAINING", "Layout", "MeshError", "ShardingError", "active_rules",
    "bytes_per_device", "constrain", "describe", "expert_dispatch", "fetch", "get_rules", "logical_to_spec",
    "make_mesh", "param_axes", "parse_mesh_spec", "place", "shard_model", "simulate_cpu_devices",
    "state_shardings", "top_k", "tree_shardings", "use_rules",
]
