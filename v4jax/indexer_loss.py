"""Lightning-indexer training losses (training spec §3, the V3.2 two-stage recipe V4 keeps).

Per query t of a CSA layer: KL(p_t ‖ softmax(I_t)) over the query's candidates, where I_t are
the indexer's scores and p_t the main attention's weights on the candidates summed over heads,
L1-normalised. `Transformer.forward(..., indexer_kl=...)` returns both per CSA layer:

- "dense" (warm-up): the candidates are every causal compressed entry of the query's document,
  p_t from the dense attention over the window, all those entries and the sink (the sink and
  window share their mass per head, as Megatron-LM's CSA, then only the entries are kept and
  renormalised). Train it with everything but the indexer frozen: `wrt=indexer_params`.
- "sparse": the candidates are the top-k the indexer selected, p_t from the attention the layer
  runs, renormalised on them. The layer feeds the indexer detached inputs and the target is a
  constant here, so the main model learns nothing from this loss (only from the LM loss).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import xlogy

# Every parameter of the CSA layers' indexers (query projection, head weights, its compressor).
indexer_params = nnx.All(nnx.Param, nnx.PathContains("indexer"))

# Logit of a non-candidate. Finite, so a query without candidates has a finite (unused) softmax.
NO_CANDIDATE = -1e30


def kl_to_scores(target, scores, candidates):
    """KL(target ‖ softmax(scores)) over the candidates of each query.

    target, scores: [..., C] (target sums to 1 over the candidates, constant: no gradient);
    candidates: [..., C] bool. Returns [...] float32, 0 where a query has no candidate.
    """
    log_q = jax.nn.log_softmax(jnp.where(candidates, scores.astype(jnp.float32), NO_CANDIDATE), axis=-1)
    p = jax.lax.stop_gradient(target.astype(jnp.float32))
    return jnp.sum(jnp.where(candidates, xlogy(p, p) - p * log_q, 0.0), axis=-1)


def indexer_kl_loss(layers: list[dict], query_mask):
    """The indexer loss of a forward: over the CSA layers, the sum of each layer's mean KL over the
    real queries (query_mask [batch, T], 1 for real tokens) that have a candidate.

    layers: `forward(..., indexer_kl=...)`'s aux["indexer"], arrays [reps, batch, T, C].
    """
    total = jnp.zeros((), jnp.float32)
    for side in layers:
        kl = kl_to_scores(side["target"], side["scores"], side["candidates"])  # [reps, batch, T]
        counted = jnp.any(side["candidates"], axis=-1) & (query_mask[None] > 0)
        per_layer = jnp.sum(jnp.where(counted, kl, 0.0), axis=(1, 2)) / jnp.maximum(jnp.sum(counted, axis=(1, 2)), 1)
        total = total + jnp.sum(per_layer)
    return total
