"""Eager parameter draws: the same bits as the plain jax expression, the same model as the traced build."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax.config import ModelConfig
from v4jax.model import Transformer
from v4jax.params import MIN_FLAT_DRAW, normal


@pytest.mark.parametrize("shape", [(24, 512), (3, 5, 7), (MIN_FLAT_DRAW + 3,)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn])
def test_eager_normal_is_the_jax_expression_bit_for_bit(shape, dtype):
    got = normal(nnx.Rngs(5), shape, 0.02 if dtype != jnp.float8_e4m3fn else 1.0, dtype)
    key = nnx.Rngs(5).params()
    want = ((0.02 if dtype != jnp.float8_e4m3fn else 1.0) * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    assert got.shape == shape and got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), np.asarray(want).view(np.uint8))


def test_eager_model_has_the_traced_structure():
    """Stacks built block by block on the host: the graph, variable types and metadata of the vmapped build."""
    raw = json.load(open("configs/tiny.json"))
    raw.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
    cfg = ModelConfig.from_dict(raw, dtype="float32", quant_sim=False)
    eager_def, eager = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    traced_def, traced = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    assert eager_def == traced_def
    eager, traced = dict(nnx.to_flat_state(eager)), dict(nnx.to_flat_state(traced))
    assert eager.keys() == traced.keys()
    for path, v in eager.items():
        t = traced[path]
        assert type(v) is type(t) and v.get_metadata() == t.get_metadata(), path
        assert (v.get_value().shape, v.get_value().dtype) == (t.get_value().shape, t.get_value().dtype), path
