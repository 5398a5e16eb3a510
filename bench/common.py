"""What the benches against Hugging Face transformers' DeepSeek-V4 port share: the bench config,
a random published checkpoint loaded by both (v4jax through `load_pretrained`, HF through
`from_pretrained` on the same tensors dequantised to float32 under their published names, which
HF's own renaming maps onto its modules; both float32 without quantisation-aware simulation),
and timing (best of N; median of N interleaved)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from v4jax import quant
from v4jax.checkpoint import read_published, write_random_checkpoint
from v4jax.checkpoint.loading import load_pretrained
from v4jax.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
# Four layers (CSA, HCA, CSA, HCA; the first hash-routed), 64 experts with k = 6 as in Flash.
BENCH = dict(hidden_size=256, num_attention_heads=4, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=128,
             index_n_heads=4, index_head_dim=128, index_topk=64, n_routed_experts=64, num_experts_per_tok=6,
             moe_intermediate_size=128, vocab_size=2048, num_hash_layers=1, num_hidden_layers=4,
             compress_ratios=[4, 128, 4, 128], num_nextn_predict_layers=0, sliding_window=128)


def bench_config() -> ModelConfig:
    raw = json.loads((ROOT / "configs/tiny.json").read_text())
    raw.update(BENCH)
    return ModelConfig.from_dict(raw)


def float_copy(published_dir: Path, out_dir: Path) -> Path:
    """The published tensors dequantised to float32 under their own names, and the config without
    its quantisation block: the form HF's port loads without an FP8 kernel."""
    pub = read_published(published_dir)
    tensors = {}
    for name in pub.tensors:
        if name.endswith(".scale"):
            continue
        value = pub.read(name)
        scale = name.removesuffix(".weight") + ".scale"
        if scale in pub.tensors:
            value = quant.dequant(value, pub.read(scale), jnp.float32)
        tensors[name] = value if np.asarray(value).dtype.kind in "iu" else np.asarray(value, np.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"))
    raw = json.loads((published_dir / "config.json").read_text())
    raw.pop("quantization_config", None)
    raw.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], torch_dtype="float32")
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2))
    return out_dir


def best_seconds(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def median_seconds(fns: dict, reps: int) -> dict:
    """Median seconds of each call after a warm-up, the calls interleaved rep by rep so that a shared
    machine's changing load falls on all of them alike."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(reps):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {key: float(np.median(ts)) for key, ts in times.items()}


def load_both(cfg: ModelConfig, folder: Path):
    """(v4jax model, HF model in eval mode) holding the same random weights, both float32."""
    # Imported here: the benches that do not run the peer (moe_audit, lora_bench) need no torch.
    import torch
    from transformers import AutoModelForCausalLM

    published = write_random_checkpoint(cfg, folder / "published")
    model = load_pretrained(published, dtype="float32", quant_sim=False)
    hf = AutoModelForCausalLM.from_pretrained(float_copy(published, folder / "float"), dtype=torch.float32)
    return model, hf.eval()
