"""Fine-tuning: next-token (+ MTP) loss, an optax step (gradient accumulation inside it), Orbax save/resume.

The step trains the variables an nnx filter `wrt` selects (nnx.Param: full fine-tuning;
adapters for LoRA). Quantised codes, the hash table and the routing bias are not
`nnx.Param`, so the optimiser never touches them; the bias moves only by the
aux-loss-free rule. Rematerialisation is `cfg.remat` (each scanned block is recomputed
in the backward pass). Optimiser state is created from the parameters, so it inherits
their sharding: shard the model (v4jax.sharding) and the moments are sharded the same way.
A training run folder (`v4jax train --out`) loads wherever a checkpoint does (`v4jax.runs`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from orbax.checkpoint.experimental import v1 as ocp

from v4jax.balancing import bias_update, load_ratio
from v4jax.checkpoint import checksum
from v4jax.checkpoint.converter import orbax_context, read_json
from v4jax.config import ModelConfig
from v4jax.errors import CheckpointError
from v4jax.indexer_loss import indexer_kl_loss
from v4jax.lora import seed_dropout
from v4jax.model import Transformer, project
from v4jax.optim import OptimizerConfig, make_transform
from v4jax.tokens import token_logprobs

RUN_INFO = "run.json"  # what makes a folder a training run: {"base": checkpoint folder, "dtype": trained in}


# Positions whose logits exist at once in head_logprobs: [batch, 2048, vocab] float32 is 1 GB per
# sequence for V4's 129,280-token vocabulary, where the whole of an 8K / 64K sequence's is 4 / 34 GB
# (and its log-softmax and gradient as much again each).
LOGIT_CHUNK = 2048


def head_logprobs(h, head_weight, targets):
    """h: [batch, T, dim] the head's input (Transformer.forward(..., hidden=True)), targets: [batch, T] ->
    (log p(target), greedy hit) [batch, T] each: the logits in chunks of LOGIT_CHUNK positions,
    each recomputed in the backward pass, so a training step never holds a sequence's logits."""
    b, t_len, _ = h.shape
    n = -(-t_len // LOGIT_CHUNK)
    pad = n * LOGIT_CHUNK - t_len

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, LOGIT_CHUNK, *a.shape[2:]), 1, 0)

    chunk = jax.checkpoint(lambda c: token_logprobs(project(c[0], head_weight), c[1]))
    out = jax.lax.map(chunk, (split(h), split(targets)))
    return tuple(jnp.moveaxis(a, 0, 1).reshape(b, n * LOGIT_CHUNK)[:, :t_len] for a in out)


def lm_loss(model, input_ids, loss_mask, mtp_weight: float = 0.0, balance_weight: float = 0.0, *,
            segment_ids=None, n_targets=None, n_micro: int = 1, indexer_loss: str = "off",
            indexer_weight: float = 0.0):
    """NLL over loss_mask, plus mtp_weight x the MTP block's t+2 NLL, plus balance_weight x the
    sequence-wise balance loss summed over the bias-routed MoE layers, plus (indexer_loss "dense"
    or "sparse") indexer_weight x the indexer KL (v4jax.indexer_loss) over the real tokens;
    "dense" is the warm-up, to be differentiated for `indexer_params` only.

    input_ids, loss_mask: [batch, T]; loss_mask[b, t] = 1 where token t is a target.
    segment_ids: [batch, T] (0: padding, 1.. one per packed document; see Transformer.forward):
    a token is a target only of a predecessor in its own document (for MTP: two before it).
    n_targets: (main, MTP) target counts the NLL sums are divided by (default: this batch's), and
    n_micro the micro-batches whose balance losses are averaged, so that the losses of a
    step's micro-batches add up to the loss of their whole batch.
    Returns (loss, (metrics, routing)): metrics "nll", "mtp_nll", "balance_loss", and
    "indexer_loss" when it is on; routing as `Transformer.forward(..., routing=True)` gives it.
    """
    # The head's inputs, not the logits: head_logprobs takes the NLL a chunk of positions at a time.
    h, mtp_h, _, routing = model.forward(input_ids, mtp=mtp_weight > 0, routing=True, segment_ids=segment_ids,
                                         indexer_kl=None if indexer_loss == "off" else indexer_loss, hidden=True)
    head = model.head.weight[...]
    mask, mtp_mask = target_masks(loss_mask, segment_ids)
    if n_targets is None:
        n_targets = (mask.sum(), mtp_mask.sum())
    logp, _ = head_logprobs(h[:, :-1], head, input_ids[:, 1:])
    nll = -jnp.sum(logp * mask) / jnp.maximum(n_targets[0], 1.0)
    balance = sum(jnp.sum(s["balance"]) for s in layer_stats(routing)) / n_micro
    metrics = {"nll": nll, "mtp_nll": jnp.zeros(()), "balance_loss": balance}
    loss = nll + balance_weight * balance
    if mtp_weight > 0:
        # MTP at position t reads token t+1 and predicts token t+2.
        mtp_logp, _ = head_logprobs(mtp_h[:, :-2], head, input_ids[:, 2:])
        metrics["mtp_nll"] = -jnp.sum(mtp_logp * mtp_mask) / jnp.maximum(n_targets[1], 1.0)
        loss = loss + mtp_weight * metrics["mtp_nll"]
    if indexer_loss != "off":
        real = jnp.ones(input_ids.shape) if segment_ids is None else segment_ids != 0
        metrics["indexer_loss"] = indexer_kl_loss(routing.pop("indexer"), real)
        loss = loss + indexer_weight * metrics["indexer_loss"]
    return loss, (metrics, routing)


def target_masks(loss_mask, segment_ids=None):
    """float32 masks of the next-token targets [batch, T-1] and the MTP (t+2) targets [batch, T-2]:
    loss_mask of the target, and with segment_ids only where the target is in its reader's document."""
    mask, mtp_mask = loss_mask[:, 1:].astype(jnp.float32), loss_mask[:, 2:].astype(jnp.float32)
    if segment_ids is not None:
        mask = mask * (segment_ids[:, 1:] == segment_ids[:, :-1])
        mtp_mask = mtp_mask * (segment_ids[:, 2:] == segment_ids[:, :-2])
    return mask, mtp_mask


def layer_stats(routing) -> list[dict]:
    """The routing statistics of every MoE layer stack (and the MTP block's), in model order."""
    stats = [s for segment in routing["layers"] for s in segment]
    return stats + ([routing["mtp"]] if routing["mtp"] is not None else [])


def layer_counts(routing) -> jax.Array:
    """The expert counts of every MoE layer in model order (hash-routed ones included), then the
    MTP block's if it ran: [layers, E]. A segment's counts are [reps, E] per block of its unit,
    and layer rep * len(unit) + j of the segment is block j's repetition rep."""
    rows = [jnp.stack([s["counts"] for s in segment], axis=1).reshape(-1, segment[0]["counts"].shape[-1])
            for segment in routing["layers"]]
    if routing["mtp"] is not None:
        rows.append(routing["mtp"]["counts"][None])
    return jnp.concatenate(rows)


def expert_loads(routing) -> dict[str, jax.Array]:
    """Per MoE layer (as `layer_counts`): "expert_load_max" and "expert_load_min", the busiest and
    the idlest expert's assignments over the mean (1: balanced; min 0: an expert nothing picked),
    and "max_expert_load", the largest over the layers."""
    counts = layer_counts(routing)
    mean = jnp.maximum(jnp.mean(counts, axis=-1), 1e-9)
    ratio = load_ratio(counts)
    return {"expert_load_max": ratio, "expert_load_min": jnp.min(counts, axis=-1) / mean,
            "max_expert_load": jnp.max(ratio)}


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
    """The optimiser of `config` (v4jax.optim) over the variables `wrt` selects (an nnx filter:
    nnx.Param for full fine-tuning, the adapters for LoRA). The moments take their parameters'
    shardings; for a sharded model call this under `use_rules` (or `jax.set_mesh`) so the scalar
    step count is on the mesh too.

    Its scalars (step counts), and the model's variables made eagerly (a fresh `Transformer`), are
    committed to the parameters' devices: left uncommitted, the first step sees other input
    shardings than every later one (whose inputs are its outputs) and compiles twice."""
    optimizer = nnx.Optimizer(model, make_transform(config), wrt=wrt)
    first = jax.tree.leaves(nnx.state(model, wrt))[0].sharding
    replicated = NamedSharding(first.mesh, PartitionSpec()) if isinstance(first, NamedSharding) else first
    for obj in (model, optimizer):
        state = nnx.state(obj)
        nnx.update(obj, jax.tree.map(lambda x: x if x.committed else jax.device_put(x, replicated), state))
    return optimizer


@nnx.jit(static_argnames=("mtp_weight", "balance_weight", "bias_update_rate", "grad_accum", "wrt", "indexer_loss",
                          "indexer_weight"))
def train_step(model, optimizer, input_ids, loss_mask, segment_ids=None, *, mtp_weight: float = 0.0,
               balance_weight: float = 0.0, bias_update_rate: float = 0.0, grad_accum: int = 1, wrt=nnx.Param,
               indexer_loss: str = "off", indexer_weight: float = 0.0, dropout_key=None):
    """One optimiser step over the variables `wrt` selects (as `make_optimizer` was given), then the
    router-bias update (bias_update_rate > 0); returns the step's metrics (before the update), the
    per-layer expert loads (`expert_loads`) among them.

    input_ids, loss_mask, segment_ids: [grad_accum * micro, T]. The gradients and expert counts
    of the grad_accum micro-batches (consecutive rows) are summed in a scan, each micro-batch's
    NLL divided by the whole batch's target count: the step equals one over the whole batch
    (the balance loss is the mean of the micro-batches' means). indexer_loss / indexer_weight as
    `lm_loss`; for the dense warm-up pass `wrt=v4jax.indexer_loss.indexer_params` (here and to
    `make_optimizer`), so that only the indexer trains. dropout_key: the step's PRNG key for LoRA
    dropout (v4jax.lora.seed_dropout; folded with the micro-batch index); None: no dropout.
    """
    rows, t_len = input_ids.shape
    if rows % grad_accum:
        raise ValueError(f"batch of {rows} rows does not split into {grad_accum} micro-batches")

    def micro(x):  # [grad_accum * micro, T] -> [grad_accum, micro, T]
        return None if x is None else x.reshape(grad_accum, rows // grad_accum, t_len)

    mask, mtp_mask = target_masks(loss_mask, segment_ids)
    n_targets = (mask.sum(), mtp_mask.sum())
    graphdef, trainable, rest = nnx.split(model, wrt, ...)

    def loss_of(trainable, ids, lmask, seg, index):
        m = nnx.merge(graphdef, trainable, rest)
        if dropout_key is not None:
            seed_dropout(m, jax.random.fold_in(dropout_key, index))
        return lm_loss(m, ids, lmask, mtp_weight, balance_weight, segment_ids=seg, n_targets=n_targets,
                       n_micro=grad_accum, indexer_loss=indexer_loss, indexer_weight=indexer_weight)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def one(xs):
        (loss, (metrics, routing)), grads = grad_fn(trainable, *xs)
        return grads, loss, metrics, _counts(routing)

    def accumulate(total, xs):
        return jax.tree.map(jnp.add, total, one(xs)), None

    xs = (micro(input_ids), micro(loss_mask), micro(segment_ids), jnp.arange(grad_accum))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(one, jax.tree.map(lambda x: x[0], xs)))
    (grads, loss, metrics, counts), _ = jax.lax.scan(accumulate, zeros, xs)
    routing = {"layers": [[{"counts": c} for c in segment] for segment in counts["layers"]],
               "mtp": None if counts["mtp"] is None else {"counts": counts["mtp"]}}
    optimizer.update(model, grads)
    if bias_update_rate:
        update_router_biases(model, routing, bias_update_rate)
    return {"loss": loss, **metrics, **expert_loads(routing), "grad_norm": optax.tree.norm(grads)}


def _counts(routing) -> dict:
    """The expert counts of `routing` (what the micro-batches of a step sum)."""
    return {"layers": [[s["counts"] for s in segment] for segment in routing["layers"]],
            "mtp": None if routing["mtp"] is None else routing["mtp"]["counts"]}


def model_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = True) -> float:
    """Training FLOPs per token as PaLM and MaxText count them for MFU: 6 x the parameters a token
    multiplies (routed experts: k of E; the embedding is a lookup; the MTP block if trained) plus
    6 x the attention multiply-adds (query . key and probability . value over the keys each query
    sees: its window, the compressed entries, CSA's top-k, and the indexer's scores), averaged over
    the positions of a seq_len row."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    active = 0.0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        name = ".".join(map(str, path))
        if name.startswith("embed.") or (name.startswith("mtp.") and not mtp):
            continue
        routed = ".experts." in name  # not shared_experts
        active += var.get_value().size * (cfg.num_experts_per_tok / cfg.n_routed_experts if routed else 1)
    p = np.arange(1, seq_len + 1, dtype=np.float64)  # keys up to and including each position
    ratios = cfg.compress_ratios[:cfg.num_hidden_layers] + (cfg.compress_ratios[-1:] if mtp else [])
    attention = 0.0
    for m in ratios:
        keys = np.minimum(p, cfg.sliding_window)
        if m:
            entries = p // m
            keys = keys + (np.minimum(entries, cfg.index_topk) if m == 4 else entries)
            if m == 4:
                attention += cfg.index_n_heads * cfg.index_head_dim * entries.mean()
        attention += 2 * cfg.num_attention_heads * cfg.head_dim * keys.mean()
    return 6.0 * (active + attention)


class Checkpoints:
    """Orbax save/resume of (model, optimiser) state, one step folder per save (Orbax's v1 training
    Checkpointer, the API the converter uses too), the last `max_to_keep` kept. Each save is atomic
    (Orbax finalises a step only once every array is written) and records a checksum per leaf,
    verified on restore, so a damaged step is a CheckpointError naming the leaf.

    `wrt` (an nnx filter) saves only the model variables it selects (e.g. LoRA adapters: the base
    weights come from the base checkpoint); None saves the whole model state, router biases too.
    `extra` is JSON saved with a step (the data loader's position)."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, wrt=None):
        self.directory = Path(directory).absolute()  # Orbax wants absolute paths
        self.wrt = wrt
        self._checkpointer = ocp.training.Checkpointer(
            self.directory, context=orbax_context(), preservation_policy=ocp.training.preservation_policies.LatestN(max_to_keep))

    def save(self, step: int, model, optimizer, extra: dict | None = None) -> None:
        state = self._pure_state(model, optimizer)
        sums = checksum.finish(checksum.start(_by_path(state)))
        self._checkpointer.save(step, state, custom_metadata={"checksums": sums, "extra": extra or {}})

    def latest_step(self) -> int | None:
        latest = self._checkpointer.latest
        return None if latest is None else latest.step

    def extra(self, step: int) -> dict:
        """The `extra` JSON saved with `step`."""
        return self._checkpointer.metadata(step).custom_metadata.get("extra", {})

    def restore(self, model, optimizer, step: int | None = None) -> int:
        """Restore into `model` and `optimizer` (None: the model alone) in place, onto their current
        shardings; returns the step restored (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to resume from")
        target = self._pure_state(model, optimizer)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), target)
        source = f"{self.directory} step {step}"
        try:
            recorded = self._checkpointer.metadata(step).custom_metadata["checksums"]
            restored = self._checkpointer.load(step, abstract)
        except Exception as e:  # Orbax and tensorstore raise many types for a damaged step
            raise CheckpointError(f"{source}: cannot restore: {type(e).__name__}: "
                                  f"{(str(e).strip().splitlines() or [''])[0][:300]}") from e
        checksum.verify(source, _by_path(restored), recorded)
        for obj, part in ((model, "model"), (optimizer, "optimizer")):
            if part in restored:
                state = self._state(obj) if part == "model" else nnx.state(obj)
                nnx.replace_by_pure_dict(state, restored[part])
                nnx.update(obj, state)
        return step

    def _state(self, model):
        return nnx.state(model) if self.wrt is None else nnx.state(model, self.wrt)

    def _pure_state(self, model, optimizer) -> dict:
        state = {"model": nnx.to_pure_dict(self._state(model))}
        if optimizer is not None:
            state["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
        return state


def _by_path(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------------- run folders
def training_run(folder: str | Path) -> dict | None:
    """The run.json of a training run folder ({"base", "dtype"}); None for any other folder."""
    path = Path(folder) / RUN_INFO
    if not path.is_file():
        return None
    info = read_json(path)  # one reader of a folder's JSON (regular file, bounded, unique keys)
    if not (isinstance(info, dict) and isinstance(info.get("base"), str)
            and info.get("dtype") in ("bfloat16", "float32")):
        raise CheckpointError(f"{path}: expected {{\"base\": checkpoint folder, "
                              f"\"dtype\": \"bfloat16\" | \"float32\"}}")
    if not Path(info["base"]).is_dir():
        raise CheckpointError(f"{path}: its base checkpoint {info['base']} is not there")
    return info
