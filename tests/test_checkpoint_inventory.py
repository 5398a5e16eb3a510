"""The published inventory and file split derived from the config alone, and the model layout."""

from pathlib import Path

import pytest
from flax import nnx

from v4jax.checkpoint import weights
from v4jax.checkpoint import model_layout
from v4jax.checkpoint.layout import FileLayout
from v4jax.config import ModelConfig
from v4jax.checkpoint.inventory import dtype_histogram, published_tensors, total_bytes
from v4jax.model import Transformer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config(name: str, **runtime) -> ModelConfig:
    return ModelConfig.from_json(CONFIGS / f"{name}.json", **runtime)


def test_flash_inventory_reproduces_the_published_count_histogram_and_size():
    specs = published_tensors(config("flash"))
    assert len(specs) == 69_187
    assert total_bytes(specs) == 159_609_485_896
    assert dtype_histogram(specs) == {"BF16": 433, "F32": 417, "F8_E4M3": 375, "F8_E8M0": 34_167,
                                      "I64": 3, "I8": 33_792}


def test_pro_inventory_reproduces_the_published_count_and_size():
    specs = published_tensors(config("pro"))
    assert len(specs) == 145_116
    assert total_bytes(specs) == 864_704_792_696


def test_flash_shapes_and_per_layer_kind_presence():
    specs = published_tensors(config("flash"))
    by = {s.name: (s.dtype, s.shape) for s in specs}
    assert specs[0].name == "embed.weight" and specs[-1].name == "mtp.0.norm.weight"
    assert by["layers.5.attn.wq_b.weight"] == ("F8_E4M3", (32768, 1024))
    assert by["layers.5.attn.wq_b.scale"] == ("F8_E8M0", (256, 8))
    assert by["layers.5.attn.wo_a.weight"] == ("F8_E4M3", (8192, 4096))
    assert by["layers.5.ffn.experts.255.w1.weight"] == ("I8", (2048, 2048))
    assert by["layers.5.ffn.experts.255.w1.scale"] == ("F8_E8M0", (2048, 128))
    assert by["layers.5.ffn.experts.0.w2.weight"] == ("I8", (4096, 1024))
    # layer 0: window only, hash routed
    assert "layers.0.attn.compressor.ape" not in by and "layers.0.ffn.gate.bias" not in by
    assert by["layers.0.ffn.gate.tid2eid"] == ("I64", (129280, 6))
    # layer 2: ratio 4 (overlapping compressor + indexer), still hash routed
    assert by["layers.2.attn.compressor.ape"] == ("F32", (4, 1024))
    assert by["layers.2.attn.compressor.wkv.weight"] == ("BF16", (1024, 4096))
    assert by["layers.2.attn.indexer.wq_b.weight"] == ("F8_E4M3", (8192, 1024))
    assert by["layers.2.attn.indexer.compressor.ape"] == ("F32", (4, 256))
    assert "layers.2.ffn.gate.tid2eid" in by
    # layer 3: ratio 128 (plain compressor, no indexer), score routed
    assert by["layers.3.attn.compressor.ape"] == ("F32", (128, 512))
    assert not any(n.startswith("layers.3.attn.indexer") for n in by)
    assert by["layers.3.ffn.gate.bias"] == ("F32", (256,)) and "layers.3.ffn.gate.tid2eid" not in by
    # MTP: window only, score routed, its own projections and head collapse
    assert "mtp.0.attn.compressor.ape" not in by and "mtp.0.ffn.gate.bias" in by
    assert by["mtp.0.e_proj.weight"] == ("F8_E4M3", (4096, 4096))
    assert by["mtp.0.hc_head_fn"] == ("F32", (4, 16384))


def test_base_checkpoints_store_fp8_experts_and_float32_scales():
    by = {s.name: (s.dtype, s.shape) for s in published_tensors(config("flash-base"))}
    assert by["layers.4.ffn.experts.7.w1.weight"] == ("F8_E4M3", (2048, 4096))
    assert by["layers.4.ffn.experts.7.w1.scale"] == ("F32", (16, 32))
    assert by["layers.4.attn.wq_a.scale"] == ("F32", (8, 32))


@pytest.mark.parametrize("name, n_files", [("flash", 46), ("pro", 64)])
def test_default_split_is_the_published_one(name, n_files):
    cfg = config(name)
    shards = FileLayout.published(cfg).shards
    assert len(shards) == n_files
    assert shards[0].tensors == ("embed.weight",)
    assert {n.split(".")[1] for n in shards[1].tensors} == {"0"}
    assert set(shards[-2].tensors) == {"hc_head_base", "hc_head_fn", "hc_head_scale", "norm.weight", "head.weight"}
    mtp = {s.name for s in published_tensors(cfg) if s.name.startswith("mtp.0.")}
    assert set(shards[-1].tensors) == mtp
    assert shards[-1].file == f"model-{n_files:05d}-of-{n_files:05d}.safetensors"


def test_shard_bytes_packs_whole_layers_in_order():
    cfg = config("tiny")
    shards = FileLayout.published(cfg, shard_bytes=1 << 40).shards
    assert len(shards) == 4  # embed | all layers | head | mtp
    assert {n.split(".")[1] for n in shards[1].tensors} == {str(i) for i in range(cfg.num_hidden_layers)}
    layer = sum(s.nbytes for s in published_tensors(cfg) if s.name.startswith("layers.1."))
    for shard in FileLayout.published(cfg, shard_bytes=2 * layer).shards[1:-2]:
        layers = sorted({int(n.split(".")[1]) for n in shard.tensors})
        assert layers == list(range(layers[0], layers[-1] + 1)) and len(layers) <= 2


@pytest.mark.parametrize("name", ["tiny", "tiny-pro-base"])
@pytest.mark.parametrize("keep_quantized", [False, True])
def test_model_layout_holds_every_model_parameter_plus_only_scales(name, keep_quantized):
    cfg = config(name, dtype="float32", quantized=keep_quantized)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    held = weights.flat_abstract(model)
    layout = model_layout(cfg, keep_quantized)
    for leaf, want in held.items():
        assert (layout[leaf].shape, layout[leaf].dtype) == (want.shape, want.dtype), leaf
    assert all(n.endswith(".scale") for n in set(layout) - set(held))
