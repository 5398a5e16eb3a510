"""Model configuration, read from a published root `config.json` (spec §1).

Field names are the Hugging Face keys of the published file, so the file, the
spec and this class can be read side by side. Runtime choices that are not
model properties (activation dtype, quantisation-aware simulation, keeping the
weights quantised on device, rematerialisation) are separate fields with
defaults and never appear in `config.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from v4jax.errors import ConfigError

# How the routed experts may be multiplied (v4jax.moe: what each does, and the choice per backend).
MOE_IMPLS = ("ragged", "tiled", "looped", "gather")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN frequency interpolation, applied to layers with compress ratio > 0 (spec §2.3)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float


# Keys of the published file that carry no information the math needs; each one
# is either ignored (identity, bookkeeping) or pinned to the only value the
# architecture supports.
_IGNORED_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "initializer_range", "use_cache",
    "transformers_version", "attention_dropout",
})
# What identifies the file to other tools (HF transformers' AutoConfig reads model_type); written
# by `to_dict`, ignored on reading.
_IDENTITY = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16"}
_PINNED_KEYS = {
    "num_key_value_heads": 1,  # single shared K = V head (MQA)
    "n_shared_experts": 1,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "hidden_act": "silu",
    "attention_bias": False,
    "tie_word_embeddings": False,
}
_DTYPES = ("bfloat16", "float32")
_INT_KEYS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "qk_rope_head_dim",
    "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "num_hash_layers", "hc_mult",
    "hc_sinkhorn_iters", "num_nextn_predict_layers",
})
_FLOAT_KEYS = frozenset({"compress_rope_theta", "rope_theta", "routed_scaling_factor", "swiglu_limit", "hc_eps",
                         "rms_norm_eps"})
# Tensors a published checkpoint may list (the inventory is built name by name; Pro lists 145,116):
# a config naming a billion experts is refused here rather than enumerated for hours.
_MAX_TENSORS = 1 << 21
# Sizes the math divides by or builds arrays from: zero cannot run.
_POSITIVE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window", "index_n_heads",
                  "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
                  "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads(..., object_pairs_hook=unique_keys)`: a key given twice is an error (ValueError),
    not silently the last value, in configs, indexes and safetensors headers alike."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


# A JSON file of a checkpoint folder (config, index, recorded layout, tokenizer) is read whole; none
# comes near this size (Pro's index: 10 MB, a tokenizer.json: 10 MB).
_JSON_BYTES = 256 * 2**20


def load_json_file(path: str | Path) -> Any:
    """The value of a JSON file, read as UTF-8 with unique keys. Only a regular file of at most
    256 MiB is read: a FIFO would block and a device (a config.json linked to /dev/zero) never
    ends. Raises OSError, or ValueError (not a regular file, too large, invalid UTF-8 or JSON, a
    key given twice); callers name the file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > _JSON_BYTES:
            raise ValueError(f"{info.st_size} bytes, more than any JSON file v4jax reads ({_JSON_BYTES})")
        raw = f.read(_JSON_BYTES + 1)
    return json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool (an int subclass), not a float such as 4.0


def _is_token(value: Any, vocab_size: int) -> bool:
    return _is_int(value) and 0 <= value < vocab_size


def _is_number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    compress_rope_theta: float
    rope_theta: float
    rope_scaling: RopeScaling
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    num_hash_layers: int
    swiglu_limit: float
    hc_mult: int
    hc_sinkhorn_iters: int
    hc_eps: float
    rms_norm_eps: float
    num_nextn_predict_layers: int
    # "fp4": routed experts packed E2M1 with 1x32 scales; "fp8": E4M3 with 128x128 scales (Base).
    expert_dtype: str = "fp4"
    # "ue8m0": block scales stored as F8_E8M0 bytes; None: stored as float32 values (Base).
    scale_fmt: str | None = "ue8m0"
    # Published, not used by the math; None where a file gives none. The longest sequence the model
    # is meant to run (Flash / Pro: 16 x 65536), and the special token ids (eos: one or several).
    max_position_embeddings: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    # ---- runtime choices (not in config.json) ----
    dtype: str = "bfloat16"  # activations and dequantised weights at rest
    quant_sim: bool = True  # FP8 act quant, FP8 KV and FP4 indexer fake-quant (spec §2.13)
    quantized: bool = False  # keep FP8/FP4 codes + scales as parameters
    remat: bool = False  # rematerialise each scanned block in the backward pass
    moe_impl: str | None = None  # routed-expert matmul: None = per backend (moe.MOE_IMPL), or one of MOE_IMPLS

    _REQUIRED = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window",
        "compress_ratios", "compress_rope_theta", "rope_theta", "rope_scaling", "index_n_heads",
        "index_head_dim", "index_topk", "n_routed_experts", "num_experts_per_tok",
        "moe_intermediate_size", "routed_scaling_factor", "num_hash_layers", "swiglu_limit",
        "hc_mult", "hc_sinkhorn_iters", "hc_eps", "rms_norm_eps", "num_nextn_predict_layers",
    )

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_json(cls, path: str | Path, **runtime: Any) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = load_json_file(path)
        except (OSError, ValueError) as e:  # ValueError: invalid UTF-8 or JSON, a duplicate key
            raise ConfigError(f"{path}: cannot read config: {type(e).__name__}: {e}") from None
        return cls.from_dict(raw, source=str(path), **runtime)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config", **runtime: Any) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a JSON object")
        fields = {}
        for key, value in raw.items():
            if key in _IGNORED_KEYS:
                continue
            if key in _PINNED_KEYS:
                if value != _PINNED_KEYS[key]:
                    raise ConfigError(f"{source}: key {key!r} = {value!r}; only {_PINNED_KEYS[key]!r} is supported")
                continue
            if key == "quantization_config":
                fields["scale_fmt"] = _scale_fmt(value, source)
            elif key == "rope_scaling":
                fields[key] = _rope_scaling(value, source)
            elif key == "compress_ratios":
                if not isinstance(value, list) or not all(_is_int(r) for r in value):
                    raise ConfigError(f"{source}: key 'compress_ratios' = {value!r}: must be a list of integers")
                fields[key] = tuple(value)
            elif key in _INT_KEYS:
                if not _is_int(value):
                    raise ConfigError(f"{source}: key {key!r} = {value!r}: must be an integer")
                fields[key] = value
            elif key in _FLOAT_KEYS:
                if not _is_number(value):
                    raise ConfigError(f"{source}: key {key!r} = {value!r}: must be a finite number")
                fields[key] = value
            elif key in ("expert_dtype", "max_position_embeddings", "bos_token_id"):
                fields[key] = value  # checked by validate
            elif key == "eos_token_id":
                fields[key] = tuple(value) if isinstance(value, list) else value
            else:
                raise ConfigError(f"{source}: unknown key {key!r} (not a DeepSeek-V4 config field)")
        missing = [k for k in cls._REQUIRED if k not in fields]
        if missing:
            raise ConfigError(f"{source}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
        bad_runtime = set(runtime) - {"dtype", "quant_sim", "quantized", "remat", "moe_impl"}
        if bad_runtime:
            raise ConfigError(f"unknown runtime option {sorted(bad_runtime)[0]!r}")
        cfg = cls(**fields, **runtime)
        cfg.validate(source)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The published root-config form (round-trips through `from_dict`)."""
        out = {k: getattr(self, k) for k in self._REQUIRED}
        out["compress_ratios"] = list(self.compress_ratios)
        out["rope_scaling"] = {"type": "yarn", **dataclasses.asdict(self.rope_scaling)}
        out["expert_dtype"] = self.expert_dtype
        quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": [128, 128]}
        if self.scale_fmt:
            quant["scale_fmt"] = self.scale_fmt
        out["quantization_config"] = quant
        for key in ("max_position_embeddings", "bos_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = list(value) if isinstance(value, tuple) else value
        out.update(_PINNED_KEYS)
        out.update(_IDENTITY)
        return out

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every end-of-sequence id (none if the config names none)."""
        eos = self.eos_token_id
        return () if eos is None else eos if isinstance(eos, tuple) else (eos,)

    def replace(self, **changes: Any) -> "ModelConfig":
        cfg = dataclasses.replace(self, **changes)
        cfg.validate("replace()")
        return cfg

    def validate(self, source: str) -> None:
        """Refuse what the model cannot compute, naming the key and why. Types are checked first
        (this also guards configs built in Python), so every rule below compares numbers."""
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                value = getattr(self, key)  # a tuple shown as the file's list
                raise ConfigError(f"{source}: key {key!r} = {list(value) if isinstance(value, tuple) else value!r}: "
                                  f"{why}")

        for key in _INT_KEYS:
            need(_is_int(getattr(self, key)), key, "must be an integer")
        for key in _FLOAT_KEYS:
            need(_is_number(getattr(self, key)), key, "must be a finite number")
        need(isinstance(self.compress_ratios, tuple) and all(_is_int(r) for r in self.compress_ratios),
             "compress_ratios", "must be a list of integers")
        for key in _POSITIVE_KEYS:
            need(getattr(self, key) > 0, key, "must be positive")
        for key in ("num_hash_layers", "compress_rope_theta", "rope_theta", "routed_scaling_factor", "swiglu_limit",
                    "hc_eps", "rms_norm_eps"):
            need(getattr(self, key) >= 0, key, "must not be negative")
        need(self.rope_theta > 0, "rope_theta", "must be positive (the rotary base)")
        need(self.compress_rope_theta > 1, "compress_rope_theta", "must exceed 1 (YaRN divides by its log)")
        need(self.qk_rope_head_dim % 2 == 0 and self.qk_rope_head_dim < self.head_dim,
             "qk_rope_head_dim", "must be even and smaller than head_dim")
        # Every indexer dim may be rotary (an empty non-rotary part), as in the reference and HF's port.
        need(self.qk_rope_head_dim <= self.index_head_dim, "index_head_dim", "must be at least qk_rope_head_dim")
        need(self.index_head_dim & (self.index_head_dim - 1) == 0 and self.index_head_dim % 32 == 0,
             "index_head_dim", "must be a power of two and a multiple of 32 (Hadamard, FP4 blocks)")
        need((self.head_dim - self.qk_rope_head_dim) % 64 == 0, "head_dim",
             "non-RoPE dims must be a multiple of 64 (FP8 KV blocks)")
        need(self.num_attention_heads % self.o_groups == 0, "o_groups", "must divide num_attention_heads")
        need(self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok",
             "must be in 1..n_routed_experts")
        need(self.moe_intermediate_size % 32 == 0 and self.hidden_size % 32 == 0, "moe_intermediate_size",
             "expert dims must be multiples of 32 (FP4 scale groups)")
        need(self.num_hash_layers <= self.num_hidden_layers, "num_hash_layers", "exceeds num_hidden_layers")
        need(self.num_nextn_predict_layers in (0, 1), "num_nextn_predict_layers", "only 0 or 1 MTP block")
        need(len(self.compress_ratios) == self.num_hidden_layers + self.num_nextn_predict_layers,
             "compress_ratios", "needs one entry per layer plus one per MTP block")
        # At most 48 tensors per block besides its routed experts' 6 (weight and scale of w1, w2, w3).
        tensors = (self.num_hidden_layers + self.num_nextn_predict_layers) * (6 * self.n_routed_experts + 48)
        need(tensors <= _MAX_TENSORS, "n_routed_experts",
             f"with num_hidden_layers = {self.num_hidden_layers} the checkpoint would list about {tensors:,} "
             f"tensors, more than v4jax reads ({_MAX_TENSORS:,}; Pro lists 145,116)")
        need(all(r == 0 or r >= 2 for r in self.compress_ratios), "compress_ratios", "ratios are 0 or >= 2")
        need(self.expert_dtype in ("fp4", "fp8"), "expert_dtype", "must be 'fp4' or 'fp8'")
        need(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}")
        need(self.max_position_embeddings is None or (_is_int(self.max_position_embeddings)
                                                      and self.max_position_embeddings > 0),
             "max_position_embeddings", "must be a positive integer")
        ids = f"[0, {self.vocab_size}) (the vocabulary)"
        need(self.bos_token_id is None or _is_token(self.bos_token_id, self.vocab_size), "bos_token_id",
             f"must be a token id in {ids}")
        eos = self.eos_token_id
        need(eos is None or _is_token(eos, self.vocab_size)
             or (isinstance(eos, tuple) and eos and all(_is_token(t, self.vocab_size) for t in eos)),
             "eos_token_id", f"must be a token id in {ids} or a non-empty list of them")
        for key in ("quant_sim", "quantized", "remat"):
            need(isinstance(getattr(self, key), bool), key, "must be true or false")

    # ------------------------------------------------------------------ derived
    @property
    def rope_nope_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def scale_dtype(self) -> str:
        """Safetensors dtype of FP8 block scales in the published files (spec §3.4, §3.9)."""
        return "F8_E8M0" if self.scale_fmt == "ue8m0" else "F32"

    @functools.cached_property
    def layer_plan(self) -> tuple["Segment", ...]:
        """The main layers cut into scan segments of a repeated unit of 1 or 2 kinds.

        The cut minimises the number of distinct blocks traced (Flash: [swa-hash] x2,
        [csa-hash] x1, [hca, csa] x20; Pro: [hca-hash] x2, [csa-hash] x1, [hca, csa] x29).
        """
        return _layer_plan(self)

    def layer_kind(self, layer: int) -> "LayerKind":
        """Structure of block `layer`; `layer == num_hidden_layers` is the MTP block (spec §1.3)."""
        return LayerKind(ratio=self.compress_ratios[layer], hash_routed=layer < self.num_hash_layers)


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What distinguishes one block's structure from another's."""

    ratio: int  # 0: window only; 4: CSA (overlap compressor + indexer); other: HCA
    hash_routed: bool

    @property
    def overlap(self) -> bool:
        return self.ratio == 4

    @property
    def has_indexer(self) -> bool:
        return self.ratio == 4

    def short(self) -> str:
        name = {0: "swa", 4: "csa"}.get(self.ratio, f"hca{self.ratio}")
        return name + ("-hash" if self.hash_routed else "")


def _scale_fmt(quant: Any, source: str) -> str | None:
    if not isinstance(quant, dict):
        raise ConfigError(f"{source}: key 'quantization_config' must be an object")
    if quant.get("quant_method", "fp8") != "fp8" or quant.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: key 'quantization_config' describes {quant}; only fp8 e4m3 is supported")
    if quant.get("weight_block_size", [128, 128]) != [128, 128]:
        raise ConfigError(f"{source}: key 'quantization_config.weight_block_size' must be [128, 128]")
    fmt = quant.get("scale_fmt")
    if fmt not in (None, "ue8m0"):
        raise ConfigError(f"{source}: key 'quantization_config.scale_fmt' = {fmt!r}; expected 'ue8m0' or absent")
    return fmt


def _rope_scaling(value: Any, source: str) -> RopeScaling:
    if not isinstance(value, dict) or value.get("type", value.get("rope_type")) != "yarn":
        raise ConfigError(f"{source}: key 'rope_scaling' must be a YaRN object, got {value!r}")
    for key in ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow"):
        if key not in value:
            raise ConfigError(f"{source}: key 'rope_scaling' is missing {key!r}")
        if not _is_number(value[key]):
            raise ConfigError(f"{source}: key 'rope_scaling.{key}' = {value[key]!r}: must be a finite number")
    if not _is_int(value["original_max_position_embeddings"]) or value["original_max_position_embeddings"] <= 0:
        raise ConfigError(f"{source}: key 'rope_scaling.original_max_position_embeddings' = "
                          f"{value['original_max_position_embeddings']!r}: must be a positive integer")
    if value["factor"] < 1:
        raise ConfigError(f"{source}: key 'rope_scaling.factor' = {value['factor']!r}: must be >= 1")
    for key in ("beta_fast", "beta_slow"):
        if value[key] <= 0:
            raise ConfigError(f"{source}: key 'rope_scaling.{key}' = {value[key]!r}: must be positive "
                              "(YaRN takes the log of a division by it)")
    return RopeScaling(factor=float(value["factor"]),
                       original_max_position_embeddings=value["original_max_position_embeddings"],
                       beta_fast=float(value["beta_fast"]), beta_slow=float(value["beta_slow"]))


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers first .. first + reps*len(unit) - 1, a unit of kinds repeated `reps` times."""

    first: int
    unit: tuple[LayerKind, ...]
    reps: int

    def layer(self, rep: int, u: int) -> int:
        return self.first + rep * len(self.unit) + u


def _layer_plan(cfg: ModelConfig) -> tuple[Segment, ...]:
    """Fewest traced blocks (a segment of unit p costs p), ties to units of 1 and then to fewer
    repetitions. Linear in the layers: the starts from which layers first..end-1 repeat one unit
    of p kinds are end - p plus, if the last two units agree, the starts for end - p."""
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)]
    n = len(kinds)
    cost = [0] * (n + 1)  # cost[i]: fewest blocks traced for layers < i
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)  # cut[i]: (first layer, unit length) of that plan's last segment
    starts = {p: [(0, 0)] * (n + 1) for p in (1, 2)}  # starts[p][end]: min (cost[first], -first) over those starts
    for end in range(1, n + 1):
        options = []
        for p in (1, 2):
            if end < p:
                continue
            start = (cost[end - p], -(end - p))
            if end >= 2 * p and kinds[end - p:end] == kinds[end - 2 * p:end - p]:
                start = min(start, starts[p][end - p])
            starts[p][end] = start
            options.append((start[0] + p, p, -start[1]))
        cost[end], p, first = min(options, key=lambda o: (o[0], o[1]))  # ties: the unit of 1
        cut[end] = (first, p)
    segments, end = [], n
    while end:
        first, p = cut[end]
        segments.append(Segment(first, tuple(kinds[first:first + p]), (end - first) // p))
        end = first
    return tuple(reversed(segments))
