"""Conversion is exact (against independent numpy decoding and hand-made bytes), streams onto any
sharding, restores onto a different mesh, and exports back byte for byte."""

import json
import runpy
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import oracle
from v4jax.checkpoint import weights
from v4jax.checkpoint import (CheckpointError, convert, converted_config, export, iter_model_layout, load_flat,
                              model_layout, read_published, write_random_checkpoint)
from v4jax.cli import main as cli
from v4jax.model import Transformer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_random_checkpoint(CONFIGS / "tiny.json", tmp_path_factory.mktemp("ckpt") / "tiny")
    (folder / "tokenizer.json").write_text('{"model": "travels along"}')
    return folder


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_random_checkpoint(CONFIGS / "tiny-pro-base.json", tmp_path_factory.mktemp("ckpt") / "base")


def raw_tensors(folder):
    published = read_published(folder)
    return {name: published.read(name) for name in published.tensors}


def expected_leaves(raw, cfg):
    """The model layout computed from the raw bytes with the oracle's independent decoders (float64)."""
    deq = oracle.dequantize_published(raw)
    out = {}
    for name, value in raw.items():
        stem, _, kind = name.rpartition(".")
        if ".experts." in name:
            prefix, e, proj = stem.rsplit(".", 2)
            if e == "0":
                members = [f"{prefix}.{i}.{proj}.{kind}" for i in range(cfg.n_routed_experts)]
                values = [oracle._scale_values(raw[m]) if kind == "scale" else deq[m] for m in members]
                out[f"{prefix}.{proj}.{kind}"] = np.stack(values)
        elif kind == "scale" and stem + ".weight" in raw and raw[stem + ".weight"].dtype.itemsize == 1:
            out[name] = oracle._scale_values(value)
        elif name.endswith("wo_a.weight"):
            out[name] = deq[name].reshape(cfg.o_groups, -1, deq[name].shape[-1])
        else:
            out[name] = deq[name]
    return out


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    return names == sorted(p.name for p in b.iterdir()) and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


@pytest.mark.parametrize("which", ["tiny", "tiny_base"])
def test_dequantised_leaves_equal_independent_numpy_decoding(which, request, tmp_path):
    src = request.getfixturevalue(which)
    dst = convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    cfg = converted_config(dst)
    flat = load_flat(dst, model_layout(cfg, keep_quantized=False))
    expected = expected_leaves(raw_tensors(src), cfg)
    assert set(flat) == set(expected)
    for name, value in flat.items():
        assert np.array_equal(np.asarray(value, np.float64), expected[name]), name


def test_hand_made_fp4_and_fp8_bytes_decode_to_their_values(tiny, tmp_path):
    src = Path(shutil.copytree(tiny, tmp_path / "src"))
    published = read_published(src)

    def poke(name, data):
        with open(published.tensors[name].file, "r+b") as f:
            f.seek(published.tensors[name].offset)
            f.write(bytes(data))

    # FP4: low nibble = even column. 0x71 -> (0.5, 6), 0x9A -> (-1, -0.5), 0x0F -> (-6, 0), 0xF0 -> (0, -6)
    poke("layers.1.ffn.experts.5.w1.weight", [0x71, 0x9A, 0x0F, 0xF0])
    poke("layers.1.ffn.experts.5.w1.scale", [128])  # E8M0 128 = 2.0
    # E4M3: 0x38 = 1, 0xC0 = -2, 0x01 = 2^-9 (subnormal), 0x7E = 448
    poke("layers.1.attn.wq_a.weight", [0x38, 0xC0, 0x01, 0x7E])
    poke("layers.1.attn.wq_a.scale", [126])  # 0.5
    dst = convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    flat = load_flat(dst, model_layout(converted_config(dst), keep_quantized=False))
    fp4 = np.asarray(flat["layers.1.ffn.experts.w1.weight"])[5, 0, :8]
    assert fp4.tolist() == [1.0, 12.0, -2.0, -1.0, -12.0, 0.0, 0.0, -12.0]
    fp8 = np.asarray(flat["layers.1.attn.wq_a.weight"])[0, :4]
    assert fp8.tolist() == [0.5, -1.0, 2.0**-10, 224.0]


def test_hand_made_fp8_expert_bytes_with_float32_scales(tiny_base, tmp_path):
    src = Path(shutil.copytree(tiny_base, tmp_path / "src"))
    published = read_published(src)
    for name, data in [("layers.4.ffn.experts.2.w2.weight", bytes([0x38, 0xC0, 0x01, 0x7E])),
                       ("layers.4.ffn.experts.2.w2.scale", np.float32(0.25).tobytes())]:
        with open(published.tensors[name].file, "r+b") as f:
            f.seek(published.tensors[name].offset)
            f.write(data)
    dst = convert(src, tmp_path / "orbax", dtype="float32", progress=False)
    flat = load_flat(dst, model_layout(converted_config(dst), keep_quantized=False))
    assert np.asarray(flat["layers.4.ffn.experts.w2.weight"])[2, 0, :4].tolist() == [0.25, -0.5, 2.0**-11, 112.0]
    assert np.asarray(flat["layers.4.ffn.experts.w2.scale"])[2, 0, 0] == 0.25


@pytest.mark.parametrize("which, keep_quantized, dtype", [
    ("tiny", False, "bfloat16"), ("tiny", True, "bfloat16"),
    ("tiny_base", False, "float32"), ("tiny_base", True, "float32")])
def test_export_of_a_converted_checkpoint_is_byte_exact(which, keep_quantized, dtype, request, tmp_path):
    src = request.getfixturevalue(which)
    converted = convert(src, tmp_path / "orbax", keep_quantized=keep_quantized, dtype=dtype, progress=False)
    assert (converted / "tokenizer.json").exists() == (src / "tokenizer.json").exists()
    back = export(converted, tmp_path / "back", progress=False)
    assert same_files(src, back)


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    return convert(tiny, tmp_path_factory.mktemp("orbax") / "tiny", progress=False)  # bf16, on one device


def test_load_flat_checks_names_shapes_and_dtypes(converted):
    name = "layers.1.ffn.experts.w1.weight"
    stored = model_layout(converted_config(converted), keep_quantized=False)[name]
    as_f32 = load_flat(converted, {name: jax.ShapeDtypeStruct(stored.shape, jnp.float32)})[name]
    as_bf16 = load_flat(converted, {name: stored})[name]
    assert as_f32.dtype == jnp.float32 and np.array_equal(as_f32, np.asarray(as_bf16, np.float32))
    with pytest.raises(CheckpointError, match=rf"leaf {name} is bfloat16\[8, 64, 128\], asked for int8"):
        load_flat(converted, {name: jax.ShapeDtypeStruct(stored.shape, jnp.int8)})
    with pytest.raises(CheckpointError, match="no leaf layers.9.attn_norm.weight"):
        load_flat(converted, {"layers.9.attn_norm.weight": jax.ShapeDtypeStruct((128,), jnp.bfloat16)})


def test_export_names_a_missing_leaf(converted, tmp_path):
    cfg = converted_config(converted)
    flat = load_flat(converted, model_layout(cfg, keep_quantized=False))
    del flat["layers.2.attn.wkv.weight"]
    with pytest.raises(CheckpointError, match="flat dict: leaf layers.2.attn.wkv.weight is missing"):
        export(flat, tmp_path / "out", cfg=cfg, progress=False)
    assert not (tmp_path / "out").exists()


def test_restores_onto_a_different_sharding_than_it_was_saved_with(converted):
    layout = model_layout(converted_config(converted), keep_quantized=False)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def spread(shape):  # first dim split 8 ways where it divides, else replicated
        return NamedSharding(mesh, P("x") if shape and shape[0] % 8 == 0 else P())

    abstract = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=spread(s.shape)) for n, s in layout.items()}
    sharded = load_flat(converted, abstract)
    single = load_flat(converted, layout)
    experts = sharded["layers.2.ffn.experts.w1.weight"]
    assert experts.sharding == spread(experts.shape) and len(experts.addressable_shards) == 8
    assert experts.addressable_shards[0].data.shape == (1,) + experts.shape[1:]
    for name in layout:
        assert sharded[name].sharding == abstract[name].sharding
        assert np.array_equal(np.asarray(sharded[name]).view(np.uint8), np.asarray(single[name]).view(np.uint8))


@pytest.mark.parametrize("keep_quantized", [False, True])
def test_streaming_onto_a_mesh_reads_each_device_window_exactly(tiny, keep_quantized):
    """Windows that cut FP8 128-blocks and FP4 32-groups, partially replicated over a (4, 2) mesh."""
    published = read_published(tiny)
    cfg = published.cfg.replace(dtype="float32")
    mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def sharding_for(name, shape):
        spec = [None] * len(shape)
        if shape[-1] % 4 == 0:
            spec[-1] = "a"  # last dim 4 ways, replicated over b
        if len(shape) > 1 and shape[-2] % 2 == 0:
            spec[-2] = "b"
        return NamedSharding(mesh, P(*spec))

    single = dict(iter_model_layout(published, cfg, keep_quantized))
    for name, value in iter_model_layout(published, cfg, keep_quantized, sharding_for):
        assert value.sharding == sharding_for(name, value.shape)
        assert np.array_equal(np.asarray(value).view(np.uint8), np.asarray(single[name]).view(np.uint8)), name


def test_export_of_a_model_re_encodes_dequantised_weights(tiny, tmp_path):
    """From `weights.to_flat(model)`: no stored scales, so fresh ones; values survive exactly, and a
    weight that outgrew its stored scale is not clipped."""
    converted = convert(tiny, tmp_path / "orbax", dtype="float32", progress=False)
    cfg = converted_config(converted)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    weights.load_flat(model, load_flat(converted, weights.flat_abstract(model)))
    flat = weights.to_flat(model)
    back = export(flat, tmp_path / "from_model", cfg=cfg, progress=False)
    again = load_flat(convert(back, tmp_path / "again", dtype="float32", progress=False), weights.flat_abstract(model))
    for name, value in flat.items():
        assert np.array_equal(np.asarray(again[name]), np.asarray(value)), name

    layout = load_flat(converted, model_layout(cfg, keep_quantized=False))
    grown = {**layout, "layers.3.attn.wo_b.weight": 4 * layout["layers.3.attn.wo_b.weight"]}
    regrown = load_flat(convert(export(grown, tmp_path / "grown", cfg=cfg, progress=False), tmp_path / "g2",
                                dtype="float32", progress=False), {"layers.3.attn.wo_b.weight": layout[
                                    "layers.3.attn.wo_b.weight"]})
    assert np.array_equal(np.asarray(regrown["layers.3.attn.wo_b.weight"]),
                          np.asarray(grown["layers.3.attn.wo_b.weight"]))


def test_converted_random_checkpoint_runs_the_model_like_the_oracle(tiny, tmp_path):
    converted = convert(tiny, tmp_path / "orbax", dtype="float32", progress=False)
    cfg = converted_config(converted).replace(quant_sim=False)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    weights.load_flat(model, load_flat(converted, weights.flat_abstract(model)))
    ids = np.asarray(jax.random.randint(jax.random.key(1), (1, 24), 0, cfg.vocab_size))
    logits, mtp_logits = nnx.jit(lambda m, x: m.forward(x, mtp=True)[:2])(model, jnp.asarray(ids))
    ref = oracle.forward(json.loads((tiny / "config.json").read_text()),
                         oracle.dequantize_published(raw_tensors(tiny)), ids)
    for got, want in ((logits, ref["logits"]), (mtp_logits, ref["mtp_logits"])):
        got = np.asarray(got, np.float64)
        assert np.isfinite(got).all() and 0.05 < np.abs(want).max() < 50
        assert np.sqrt(((got - want) ** 2).mean() / (want**2).mean()) < 1e-5


def test_cli_converts_onto_a_mesh_and_exports_back(tiny, tmp_path):
    cli(["convert", str(tiny), str(tmp_path / "orbax"), "--mesh", "expert=8", "--keep-quantized"])
    assert json.loads((tmp_path / "orbax" / "v4jax.json").read_text()) == {"dtype": "bfloat16",
                                                                          "keep_quantized": True}
    cli(["export", str(tmp_path / "orbax"), str(tmp_path / "back")])
    assert same_files(tiny, tmp_path / "back")


def test_make_checkpoint_tool_writes_the_published_layout(tmp_path):
    tool = runpy.run_path(str(ROOT / "tools" / "make_checkpoint.py"), run_name="tool")
    tool["main"]([str(CONFIGS / "tiny.json"), str(tmp_path / "ckpt"), "--seed", "3"])
    published = read_published(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "config.json").read_bytes() == (CONFIGS / "tiny.json").read_bytes()
    assert len(published.layout.shards) == 9 and published.cfg.num_hidden_layers == 6
