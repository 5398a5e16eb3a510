"""load_pretrained: published folder, converted folder and a sharded mesh all give the logits of an
independent decoding of the published bytes run through the numpy oracle."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import oracle
import v4jax
from v4jax.checkpoint import convert, write_random_checkpoint
from v4jax.config import ModelConfig
from v4jax.sharding import make_mesh, use_rules

forward = nnx.jit(lambda m, ids: m(ids))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    write_random_checkpoint(ModelConfig.from_json("configs/tiny.json"), root / "published", seed=3)
    convert(root / "published", root / "converted", dtype="float32", progress=False)
    convert(root / "published", root / "quantized", dtype="float32", keep_quantized=True, progress=False)
    return root


@pytest.fixture(scope="module")
def ids():
    return np.asarray(jax.random.randint(jax.random.key(0), (2, 160), 0, 512))


@pytest.fixture(scope="module")
def reference(folders, ids):
    """Oracle logits from the published bytes, decoded by the oracle's own decoders."""
    index = json.loads((folders / "published/model.safetensors.index.json").read_text())
    tensors = {}
    for file in sorted(set(index["weight_map"].values())):
        tensors.update(read_safetensors(folders / "published" / file))
    raw = json.loads((folders / "published/config.json").read_text())
    return oracle.forward(raw, oracle.dequantize_published(tensors), ids)["logits"]


# safetensors' numpy loader has no F8_E8M0; the oracle decodes raw bytes, so read them as such.
RAW_DTYPES = {"BF16": np.uint16, "F32": np.float32, "F8_E4M3": np.uint8, "F8_E8M0": np.uint8, "I8": np.int8,
              "I64": np.int64}


def read_safetensors(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        raw = np.frombuffer(data[8 + n + begin:8 + n + end], RAW_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 -> f32: the high half of the float32 bit pattern
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        out[name] = raw
    return out


def rel(a, b):
    return float(np.sqrt(((np.asarray(a, np.float64) - b) ** 2).mean() / (b**2).mean()))


def test_published_folder_loads_to_the_oracles_logits(folders, ids, reference):
    model = v4jax.load_pretrained(folders / "published", dtype="float32", quant_sim=False)
    assert rel(forward(model, ids), reference) < 1e-5


def test_converted_and_kept_quantised_folders_give_the_same_logits(folders, ids, reference):
    converted = v4jax.load_pretrained(folders / "converted", quant_sim=False)
    quantized = v4jax.load_pretrained(folders / "quantized", quant_sim=False)
    assert quantized.cfg.quantized and not converted.cfg.quantized
    a, b = np.asarray(forward(converted, ids)), np.asarray(forward(quantized, ids))
    np.testing.assert_array_equal(a, b)
    assert rel(a, reference) < 1e-5


def test_converted_folder_restores_onto_an_8_device_mesh(folders, ids, reference):
    mesh = make_mesh("data=2,expert=4")
    model = v4jax.load_pretrained(folders / "converted", mesh=mesh, quant_sim=False)
    w1 = model.layers[2][0].ffn.experts.w1.weight[...]
    assert w1.sharding.mesh.shape["expert"] == 4 and len(w1.addressable_shards) == 8
    assert w1.addressable_shards[0].data.nbytes * 8 == w1.nbytes  # experts split 8 ways (data x expert)
    with use_rules(mesh, "inference"):
        logits = nnx.jit(lambda m, x: m(x))(model, ids)
    assert rel(logits, reference) < 1e-5
