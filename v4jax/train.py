"""Fine-tuning: next-token (+ MTP) loss, an optax step over nnx.Param only, Orbax save/resume.

Quantised codes, the hash table and the routing bias are not `nnx.Param`, so the
optimiser never touches them. Rematerialisation is `cfg.remat` (each scanned block
is recomputed in the backward pass). Optimiser state is created from the
parameters, so it inherits their sharding: shard the model (v4jax.sharding) and
the moments are sharded the same way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from orbax.checkpoint.experimental import v1 as ocp

from v4jax.balancing import bias_update, load_ratio
from v4jax.checkpoint import checksum
from v4jax.checkpoint.converter import orbax_context
from v4jax.errors import CheckpointError, DataError
from v4jax.optim import OptimizerConfig, make_transform
from v4jax.tokens import token_logprobs


def lm_loss(model, input_ids, loss_mask, mtp_weight: float = 0.0, balance_weight: float = 0.0):
    """Mean next-token NLL over loss_mask, plus mtp_weight x the MTP block's t+2 NLL, plus
    balance_weight x the sequence-wise balance loss summed over the bias-routed MoE layers.

    input_ids, loss_mask: [batch, T]; loss_mask[b, t] = 1 where token t is a target.
    Returns (loss, (metrics, routing)): metrics "nll", "mtp_nll", "balance_loss",
    "max_expert_load" (max over layers of max / mean expert load); routing as
    `Transformer.forward(..., routing=True)` gives it (for the router-bias update).
    """
    logits, mtp_logits, _, routing = model.forward(input_ids, mtp=mtp_weight > 0, routing=True)
    mask = loss_mask[:, 1:].astype(jnp.float32)
    logp, _ = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    nll = -jnp.sum(logp * mask) / jnp.maximum(mask.sum(), 1.0)
    layer_stats = [s for segment in routing["layers"] for s in segment]
    layer_stats += [routing["mtp"]] if routing["mtp"] is not None else []
    balance = sum(jnp.sum(s["balance"]) for s in layer_stats)
    metrics = {"nll": nll, "mtp_nll": jnp.zeros(()), "balance_loss": balance,
               "max_expert_load": jnp.max(jnp.stack([jnp.max(load_ratio(s["counts"])) for s in layer_stats]))}
    loss = nll + balance_weight * balance
    if mtp_weight > 0:
        # MTP at position t reads token t+1 and predicts token t+2.
        mtp_mask = loss_mask[:, 2:].astype(jnp.float32)
        mtp_logp, _ = token_logprobs(mtp_logits[:, :-2], input_ids[:, 2:])
        metrics["mtp_nll"] = -jnp.sum(mtp_logp * mtp_mask) / jnp.maximum(mtp_mask.sum(), 1.0)
        loss = loss + mtp_weight * metrics["mtp_nll"]
    return loss, (metrics, routing)


def update_router_biases(model, routing, rate: float) -> None:
    """The aux-loss-free update of every bias-routed layer's gate bias from this step's expert
    counts (global: the counts are whole-batch arrays, whatever the mesh). Hash layers have none."""
    for stack_row, stats_row in zip(model.layers, routing["layers"]):
        for block, stats in zip(stack_row, stats_row):
            if hasattr(block.ffn.gate, "bias"):
                block.ffn.gate.bias[...] = bias_update(block.ffn.gate.bias[...], stats["counts"], rate)
    if routing["mtp"] is not None and hasattr(model.mtp[0].ffn.gate, "bias"):
        gate = model.mtp[0].ffn.gate
        gate.bias[...] = bias_update(gate.bias[...], routing["mtp"]["counts"], rate)


def make_optimizer(model, config: OptimizerConfig = OptimizerConfig(), wrt=nnx.Param) -> nnx.Optimizer:
    """The optimiser of `config` (v4jax.optim) over the `wrt` leaves (nnx.Param: all trained
    parameters; nnx.LoRAParam: only LoRA adapters, v4jax.lora). The moments take their
    parameters' shardings; for a sharded model call this under `use_rules` (or `jax.set_mesh`) so
    the scalar step count is on the mesh too."""
    return nnx.Optimizer(model, make_transform(config), wrt=wrt)


@nnx.jit(static_argnames=("mtp_weight", "balance_weight", "bias_update_rate", "wrt"))
def train_step(model, optimizer, input_ids, loss_mask, mtp_weight: float = 0.0, balance_weight: float = 0.0,
               bias_update_rate: float = 0.0, wrt=nnx.Param):
    """One optimiser step over the `wrt` leaves (as the optimiser was made), then the router-bias
    update (bias_update_rate > 0); returns the metrics of the step (before the update)."""
    grad_fn = nnx.value_and_grad(lambda m: lm_loss(m, input_ids, loss_mask, mtp_weight, balance_weight),
                                 has_aux=True, argnums=nnx.DiffState(0, wrt))
    (loss, (metrics, routing)), grads = grad_fn(model)
    optimizer.update(model, grads)
    if bias_update_rate:
        update_router_biases(model, routing, bias_update_rate)
    return {"loss": loss, **metrics}


def packed_batches(documents: Sequence[Sequence[int]], seq_len: int, batch_size: int, seed: int = 0,
                   eos_id: int = 1) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Endless shuffled batches of documents packed into [batch, seq_len] rows (EOS between them).

    The documents are packed (and refused if they fill less than one batch) when this is
    called, not at the first batch, so bad data fails before any training step runs.
    """
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    documents = [d for d in documents if len(d)]
    stream = np.concatenate([np.append(np.asarray(d, np.int32), eos_id) for d in documents]) if documents else []
    n_rows = len(stream) // seq_len
    if n_rows < batch_size:
        raise DataError(f"data has {len(stream)} tokens (with an EOS after each document): fewer than one batch "
                        f"of {batch_size} x {seq_len}")
    rows = stream[:n_rows * seq_len].reshape(n_rows, seq_len)
    return _shuffled(rows, batch_size, np.random.default_rng(seed))


def _shuffled(rows: np.ndarray, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """rows: [n_rows, seq_len] -> endless [batch, seq_len] batches, each epoch in a new random order."""
    while True:
        order = rng.permutation(len(rows))
        for i in range(0, len(rows) - batch_size + 1, batch_size):
            batch = rows[order[i:i + batch_size]]
            yield batch, np.ones_like(batch)


class Checkpoints:
    """Orbax save/resume of (model, optimiser) state, one step folder per save (Orbax's v1 training
    Checkpointer, the API the converter uses too). Each save is atomic (Orbax finalises a step
    only once every array is written) and records a checksum per leaf, verified on restore, so
    a damaged step is a CheckpointError naming the leaf. With `wrt` (e.g. nnx.LoRAParam) only
    those model leaves are saved and restored: the rest comes from the base checkpoint."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, wrt=...):
        self.directory = Path(directory).absolute()  # Orbax wants absolute paths
        self.wrt = wrt
        self._checkpointer = ocp.training.Checkpointer(
            self.directory, context=orbax_context(), preservation_policy=ocp.training.preservation_policies.LatestN(max_to_keep))

    def save(self, step: int, model, optimizer) -> None:
        state = _pure_state(model, optimizer, self.wrt)
        sums = checksum.finish(checksum.start(_by_path(state)))
        self._checkpointer.save(step, state, custom_metadata={"checksums": sums})

    def latest_step(self) -> int | None:
        latest = self._checkpointer.latest
        return None if latest is None else latest.step

    def restore(self, model, optimizer, step: int | None = None) -> int:
        """Restore into `model` and `optimizer` in place, onto their current shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        target = _pure_state(model, optimizer, self.wrt)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
        source = f"{self.directory} step {step}"
        try:
            recorded = self._checkpointer.metadata(step).custom_metadata["checksums"]
            restored = self._checkpointer.load(step, abstract)
        except Exception as e:  # Orbax and tensorstore raise many types for a damaged step
            raise CheckpointError(f"{source}: cannot restore: {type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0][:300]}") from e
        checksum.verify(source, _by_path(restored), recorded)
        for obj, part, wrt in ((model, "model", self.wrt), (optimizer, "optimizer", ...)):
            state = nnx.state(obj, wrt)
            nnx.replace_by_pure_dict(state, restored[part])
            nnx.update(obj, state)
        return step


def _pure_state(model, optimizer, wrt) -> dict:
    return {"model": nnx.to_pure_dict(nnx.state(model, wrt)), "optimizer": nnx.to_pure_dict(nnx.state(optimizer))}


def _by_path(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
