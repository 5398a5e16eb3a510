"""Placement policy for v4jax: mesh, logical-axis rules, expert and KV-sequence parallelism.

Installed as `v4jax.sharding`. The model only names logical axes; this package
maps them to mesh axes. With no active rules every call here is a no-op, so the
same model code runs on one device unchanged.
"""

from v4jax.sharding.rules import active_rules, constrain, expert_dispatch, use_rules

__all__ = ["active_rules", "constrain", "expert_dispatch", "use_rules"]
