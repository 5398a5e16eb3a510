"""KV caches split along their compressed entries (cache_seq -> `sequence`).

The indexer of a CSA layer picks, per query, the top-k of N compressed entries.
When the entries of one sequence live on several devices, each device takes the
top-k of its own slice, the candidates (k per device) are all-gathered and a
global top-k picks the final k. This is exact: the global top-k is contained in
the union of the local ones. Ties keep the lower entry index, as `lax.top_k` does.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from v4jax.sharding.rules import active_rules


def top_k(x, k: int, axes):
    """`jax.lax.top_k` over the last dim of x: [..., N], whose logical axes are `axes`.

    Returns (values, indices) [..., k]; with the last dim split over mesh axes this
    runs as local top-k + all-gather of candidates + global top-k (in shard_map).
    """
    layout = active_rules()
    seq = layout.live_axes(axes[-1]) if layout is not None and axes[-1] is not None else ()
    if not seq:
        return jax.lax.top_k(x, k)
    spec = layout.spec(axes, x.shape, f"top-k input {tuple(axes)} {list(x.shape)}")
    n_local = x.shape[-1] // layout.size(seq)
    last = x.ndim - 1

    def local_then_global(xl):
        values, idx = jax.lax.top_k(xl, min(k, n_local))
        idx = idx + jax.lax.axis_index(seq) * n_local
        values, idx = (jax.lax.all_gather(a, seq, axis=last, tiled=True) for a in (values, idx))
        best, pos = jax.lax.top_k(values, k)
        return best, jax.numpy.take_along_axis(idx, pos, axis=-1)

    out_spec = P(*spec[:-1], None)
    return jax.shard_map(local_then_global, mesh=layout.mesh, in_specs=spec, out_specs=(out_spec, out_spec),
                         check_vma=False)(x)
