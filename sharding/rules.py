"""Logical axis names -> mesh axes (placeholder; the sharding engineer owns this file)."""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import NamedSharding, PartitionSpec

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("v4jax_rules", default=None)


def active_rules():
    """(mesh, rules) while `use_rules` is active, else None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def use_rules(mesh, rules):
    token = _ACTIVE.set((mesh, dict(rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x, axes):
    """with_sharding_constraint by logical axes; identity when no rules are active."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = PartitionSpec(*(rules.get(a) if a else None for a in axes))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def expert_dispatch(local_fn, x, ids, weights, w1, w2, w3, **kwargs):
    """Run the routed experts; with no active rules all experts are local."""
    return local_fn(x, ids, weights, w1, w2, w3, n_experts=w1.shape[0], **kwargs)
