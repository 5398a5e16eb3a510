"""LoRA adapters out of the model: folded into the base (`v4jax merge`) and in the PEFT layout for
HF transformers' DeepSeek-V4 port; and back into a model from an adapter-only training run.

Both work on the model-layout dict (v4jax.checkpoint.weights: published names, [out, in],
experts stacked per projection), where an adapter is the pair of leaves `X.lora.a`
[..., r, in] and `X.lora.b` [..., out, r] beside its weight `X.weight`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from orbax.checkpoint.experimental import v1 as ocp
from safetensors.numpy import save_file

from v4jax import quant
from v4jax.checkpoint import checksum, load_flat, model_layout, read_published, weights
from v4jax.checkpoint.converter import CHECKSUMS, INFO, LAYOUT, STATE, orbax_context, read_json
from v4jax.checkpoint.layout import INDEX
from v4jax.checkpoint.model_layout import leaves
from v4jax.checkpoint.reader import COMPANION_FILES
from v4jax.checkpoint.staging import staging
from v4jax.config import ModelConfig
from v4jax.errors import CheckpointError
from v4jax.lora import LoRAConfig, adapted_modules, apply_lora, low_rank
from v4jax.sharding import shard_model
from v4jax.train import Checkpoints

LORA_JSON = "lora.json"  # in an adapter-only training run's folder: what rebuilds its adapters
RUN_KEYS = ("rank", "alpha", "targets", "dropout", "optimizer", "dtype")


def run_record(lora: LoRAConfig, optimizer: str, dtype: str) -> dict:
    """What an adapter-only run's lora.json holds: its LoRAConfig, optimiser and compute dtype."""
    return {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets), "dropout": lora.dropout,
            "optimizer": optimizer, "dtype": dtype}


def read_run(run: Path) -> dict | None:
    """The lora.json of an adapter-only training run folder; None for any other folder."""
    path = Path(run) / LORA_JSON
    if not path.is_file():
        return None
    record = read_json(path)  # one reader of a folder's JSON (regular file, bounded, unique keys)
    if not isinstance(record, dict) or set(record) != set(RUN_KEYS):
        raise CheckpointError(f"{path}: expected the keys {', '.join(RUN_KEYS)}")
    return record


def run_lora_config(record: dict) -> LoRAConfig:
    return LoRAConfig(record["rank"], record["alpha"], tuple(record["targets"]), record["dropout"])


def restore_adapters(model, run: Path, mesh=None, rules="training") -> int:
    """Give `model` (the run's base, loaded as the run loaded it) the adapters of the adapter-only run
    folder `run`, placed by `rules` on `mesh`, their latest step restored; returns that step."""
    apply_lora(model, run_lora_config(read_run(run)), jax.random.key(0))
    if mesh is not None:
        shard_model(model, mesh, rules)
    return Checkpoints(run, wrt=nnx.LoRAParam).restore(model, None)



def merged_flat(model) -> tuple[dict[str, jax.Array], set[str]]:
    """The model-layout dict (v4jax.checkpoint.weights) of `model` with every adapter folded in and
    no adapter leaves, and the names of the adapted weights. Adapted weights are dequantised to
    float32 (W + scale * B A); every other leaf is as the model holds it, kept-quantised weights
    decoded to float32 beside their scales (the dequantised layout a converted checkpoint stores)."""
    flat = weights.to_flat(model)
    scale = next((m.lora.scale for _, m in adapted_modules(model)), 1.0)  # one LoRAConfig per model
    out, adapted = {}, set()
    for name, value in flat.items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".lora"):
            continue
        if leaf == "weight" and f"{owner}.scale" in flat:
            value = quant.dequant(value, flat[f"{owner}.scale"], jnp.float32)
        if leaf == "weight" and f"{owner}.lora.a" in flat:
            value = value.astype(jnp.float32) + low_rank(flat[f"{owner}.lora.a"], flat[f"{owner}.lora.b"],
                                                         scale, jnp.float32)
            adapted.add(name)
        out[name] = value
    return out, adapted


def tensor_kind(name: str) -> str:
    """A leaf's name without its layer / MTP index: "layers.3.attn.wq_a.weight" -> "attn.wq_a"."""
    parts = name.removesuffix(".weight").split(".")
    return ".".join(parts[2:] if parts[0] in ("layers", "mtp") else parts)


def base_leaves(base: Path, cfg: ModelConfig, names: set[str]) -> dict[str, np.ndarray]:
    """Leaves of the dequantised model layout the model does not hold (the scales of `attn.wo_a`,
    which the model keeps decoded), read from the base folder: published or converted."""
    layout = leaves(cfg.replace(dtype="float32"), keep_quantized=False)
    if not (base / INDEX).is_file():
        abstract = {leaf.name: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in layout if leaf.name in names}
        return {n: np.asarray(v) for n, v in load_flat(base, abstract).items()}
    published = read_published(base)
    return {leaf.name: np.asarray(leaf.read(published, tuple(slice(0, d) for d in leaf.shape)))
            for leaf in layout if leaf.name in names}


def fresh_scales(flat: dict[str, np.ndarray], adapted: set[str]) -> dict[str, float]:
    """Replace the stored scales of every adapted weight in `flat` (host arrays, changed in place)
    by the power-of-two scales a fresh encoding picks, which export then encodes with; returns the
    relative re-encoding error ||decode(encode(W)) - W|| / ||W|| per tensor kind (over its weights)."""
    err, norm = {}, {}
    for name in sorted(adapted):
        w = flat[name]
        owner = name.removesuffix(".weight")
        if f"{owner}.scale" not in flat:
            continue  # a bf16 / float32 tensor of the published layout: nothing to re-encode
        stored = flat[f"{owner}.scale"]
        fp4 = stored.shape[-1] == w.shape[-1] // quant.FP4_GROUP
        encode, decode = (quant.quantize_fp4, quant.dequant_fp4) if fp4 else (quant.quantize_fp8, quant.dequant_fp8)
        # The published matrices: the stored scale's leading dims (experts) stack them; wo_a
        # [G, r_o, in] is one [G * r_o, in] matrix.
        lead = stored.shape[:-2]
        scales, back = [], []
        for m in w.reshape(-1, math.prod(w.shape[len(lead):-1]), w.shape[-1]):
            codes, s = encode(m)
            scales.append(s)
            back.append(np.asarray(decode(codes, s, jnp.float32)))
        flat[f"{owner}.scale"] = np.stack(scales).reshape(*lead, *scales[0].shape)
        kind = tensor_kind(name)
        err[kind] = err.get(kind, 0.0) + float(np.sum((np.stack(back).reshape(w.shape) - w) ** 2))
        norm[kind] = norm.get(kind, 0.0) + float(np.sum(w.astype(np.float64) ** 2))
    return {k: (err[k] / norm[k]) ** 0.5 if norm[k] else 0.0 for k in err}


def write_converted(flat: dict[str, np.ndarray], cfg: ModelConfig, layout_json: str, base: Path,
                    dst: str | Path) -> Path:
    """A converted checkpoint folder (float32, dequantised: v4jax.checkpoint.converter's layout)
    holding `flat`, which must be exactly the leaves that layout stores; config.json and the
    companion files come from the folder `base`. Staged and renamed into place; an existing
    `dst` is refused."""
    dst = Path(dst).absolute()
    want = model_layout(cfg.replace(dtype="float32"), keep_quantized=False)
    if set(flat) != set(want):
        name = sorted(set(flat) ^ set(want))[0]
        raise CheckpointError(f"{dst}: leaf {name} {'is missing' if name in want else 'is not in the layout'}")
    arrays = {n: jnp.asarray(np.asarray(v, want[n].dtype)) for n, v in flat.items()}
    with staging(dst) as tmp:
        for name in ("config.json",) + COMPANION_FILES:
            if (base / name).is_file():
                shutil.copyfile(base / name, tmp / name)
        (tmp / INFO).write_text(json.dumps({"dtype": "float32", "keep_quantized": False}))
        (tmp / LAYOUT).write_text(layout_json)
        sums = checksum.finish(checksum.start(arrays))
        with orbax_context():
            ocp.partial.save_async(tmp / STATE, arrays).result()
            ocp.partial.finalize(tmp / STATE)
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=0))
    return dst


# ---------------------------------------------------------------------------- PEFT layout
# Our module (model-layout name after "layers.N.") -> HF transformers' DeepSeek-V4 port, whose
# renaming (transformers' conversion_mapping) loads the published names onto these modules.
HF_LINEARS = {
    "attn.wq_a": "self_attn.q_a_proj", "attn.wq_b": "self_attn.q_b_proj", "attn.wkv": "self_attn.kv_proj",
    "attn.wo_b": "self_attn.o_b_proj", "ffn.shared_experts.w1": "mlp.shared_experts.gate_proj",
    "ffn.shared_experts.w2": "mlp.shared_experts.down_proj", "ffn.shared_experts.w3": "mlp.shared_experts.up_proj",
    "attn.indexer.wq_b": "self_attn.compressor.indexer.q_b_proj",
    "attn.indexer.weights_proj": "self_attn.compressor.indexer.scorer.weights_proj",
}
# The port holds these as parameters (PEFT `target_parameters`, which adapts the weight itself:
# W + scale * B A, as v4jax does): the grouped o_a_proj [G * r_o, H*d/G], the router's weight
# [E, dim] and the fused experts gate_up_proj [E, 2F, dim] (w1 then w3) and down_proj [E, dim, F].
# Listed in PEFT's nesting order.
HF_PARAMETERS = ("self_attn.o_a_proj.weight", "mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj")
PEFT_PREFIX = "base_model.model.model."


def _block_diagonal(blocks: list[np.ndarray]) -> np.ndarray:
    """[out_i, r_i] blocks -> [sum out_i, sum r_i] with the blocks on the diagonal."""
    out = np.zeros((sum(b.shape[0] for b in blocks), sum(b.shape[1] for b in blocks)), np.float32)
    o = r = 0
    for b in blocks:
        out[o:o + b.shape[0], r:r + b.shape[1]] = b
        o, r = o + b.shape[0], r + b.shape[1]
    return out


def _expert_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-expert a [E, r, in], b [E, out, r] -> PEFT's lora_A [E*r, in] (expert-major rows),
    lora_B [out, r*E] (rank-major columns), the layout its ParamWrapper reshapes per expert, and r."""
    e, r, i = a.shape
    return a.reshape(e * r, i), b.transpose(1, 2, 0).reshape(b.shape[1], r * e), r


def peft_adapter(flat: dict[str, np.ndarray], n_layers: int):
    """PEFT tensors {name: array}, ranks {target: r} and the adapted HF module / parameter names for the
    main model's adapters in the model-layout dict `flat` (MTP adapters stay out: the port has no MTP
    block). Fused or grouped targets get the stacked rank (2r for gate_up_proj, G r for o_a_proj)
    with zero cross blocks, which reproduces v4jax's per-projection, per-group updates exactly."""
    tensors, ranks, linears, params = {}, {}, set(), []

    def pair(name):
        if f"{name}.lora.a" not in flat:
            return None
        return np.asarray(flat[f"{name}.lora.a"], np.float32), np.asarray(flat[f"{name}.lora.b"], np.float32)

    for layer in range(n_layers):
        p = f"layers.{layer}."
        for ours, hf in HF_LINEARS.items():
            if (ab := pair(p + ours)) is not None:
                tensors[f"{PEFT_PREFIX}{p}{hf}.lora_A.weight"], tensors[f"{PEFT_PREFIX}{p}{hf}.lora_B.weight"] = ab
                ranks[hf] = ab[0].shape[0]
                linears.add(hf)
        fused = {}
        if (ab := pair(p + "attn.wo_a")) is not None:  # a [G, r, in_g], b [G, r_o, r]: one block per group
            a = ab[0].reshape(-1, ab[0].shape[-1])
            fused[HF_PARAMETERS[0]] = a, _block_diagonal(list(ab[1])), a.shape[0]
        if (ab := pair(p + "ffn.gate")) is not None:  # a [r, dim], b [E, r]
            fused[HF_PARAMETERS[1]] = *ab, ab[0].shape[0]
        w1, w3, w2 = (pair(p + f"ffn.experts.{w}") for w in ("w1", "w3", "w2"))
        if w1 is not None or w3 is not None:
            like = w1 if w1 is not None else w3
            zero = like[0][:, :0], np.zeros_like(like[1][:, :, :0])  # an unadapted half: rank 0
            (a1, b1), (a3, b3) = (w if w is not None else zero for w in (w1, w3))
            b = np.stack([_block_diagonal([x, y]) for x, y in zip(b1, b3)])
            fused[HF_PARAMETERS[2]] = _expert_pair(np.concatenate([a1, a3], axis=1), b)
        if w2 is not None:
            fused[HF_PARAMETERS[3]] = _expert_pair(*w2)
        by_module: dict[str, list[str]] = {}
        for target in (t for t in HF_PARAMETERS if t in fused):
            by_module.setdefault(target.rsplit(".", 1)[0], []).append(target)
        for module, targets in by_module.items():
            for depth, target in enumerate(targets):  # PEFT wraps later targets around earlier ones
                key = f"{PEFT_PREFIX}{p}{module}." + "base_layer." * (len(targets) - 1 - depth)
                tensors[key + "lora_A.weight"], tensors[key + "lora_B.weight"], ranks[target] = fused[target]
                if target not in params:
                    params.append(target)
    return tensors, ranks, sorted(linears), params


def write_peft(model, dst: str | Path) -> Path:
    """`adapter_model.safetensors` + `adapter_config.json` for `model`'s adapters, loadable with
    `peft.PeftModel.from_pretrained` onto HF transformers' DeepSeek-V4 port. Staged and renamed
    into place; an existing `dst` is refused."""
    dst = Path(dst).absolute()
    adapted = adapted_modules(model)
    if not adapted:
        raise CheckpointError(f"{dst}: the model has no LoRA adapters to export")
    scale = adapted[0][1].lora.scale
    flat = {n: v for n, v in weights.to_flat(model).items() if ".lora." in n}
    tensors, ranks, linears, params = peft_adapter(flat, model.cfg.num_hidden_layers)
    base_rank = ranks[linears[0]] if linears else min(ranks.values())
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": base_rank, "lora_alpha": scale * base_rank,
        "target_modules": linears, "target_parameters": params, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
        # Per-target ranks where they differ, with alpha = scale * rank so every update keeps the one scale.
        "rank_pattern": {t: r for t, r in ranks.items() if r != base_rank},
        "alpha_pattern": {t: scale * r for t, r in ranks.items() if r != base_rank},
    }
    with staging(dst) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"))
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return dst
