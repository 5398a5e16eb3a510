"""Packed rows (segment ids): every document's logits and MTP logits are those of the document run alone."""

import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_model import randomize
from v4jax.attention import document_layout
from v4jax.config import ModelConfig
from v4jax.errors import DataError
from v4jax.model import Transformer

RAW = json.load(open("configs/tiny.json"))
# CSA and HCA layers and the (window-only) MTP block; window 128, groups of 4 and 128.
RAW.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)
# Lengths cross groups of 4 and 128 and the window; 130 and 70 leave tails of 2 (< 4) tokens.
DOCS = (300, 130, 70)
# Two rows: the documents in two orders, each padded to a multiple of 128 (different padding tokens).
ORDERS = ((0, 1, 2), (2, 0, 1))
ROW = sum(-(-n // 128) * 128 for n in DOCS)  # 768


@functools.cache
def tiny_model() -> Transformer:
    """The fp32 model of RAW, built once per session (test_indexer_loss uses it too)."""
    model = Transformer(ModelConfig.from_dict(RAW, dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))
    randomize(model)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def docs():
    rng = np.random.default_rng(3)
    return [rng.integers(0, RAW["vocab_size"], n) for n in DOCS]


def pack(docs, rng):
    """-> ids, segment_ids [rows, ROW] and each row's (document, start) list."""
    ids = rng.integers(0, RAW["vocab_size"], (len(ORDERS), ROW))  # padding keeps these random ids
    seg = np.zeros_like(ids)
    layout = []
    for r, order in enumerate(ORDERS):
        start, row = 0, []
        for k, d in enumerate(order):
            ids[r, start:start + DOCS[d]] = docs[d]
            seg[r, start:start + DOCS[d]] = k + 1
            row.append((d, start))
            start += -(-DOCS[d] // 128) * 128
        layout.append(row)
    return ids, seg, layout


packed_forward = nnx.jit(lambda m, ids, seg: m.forward(ids, mtp=True, segment_ids=seg)[:2])
plain_forward = nnx.jit(lambda m, ids: m.forward(ids, mtp=True)[:2])


def test_packed_documents_match_each_document_alone(model, docs):
    ids, seg, layout = pack(docs, np.random.default_rng(4))
    logits, mtp_logits = (np.asarray(a) for a in packed_forward(model, jnp.asarray(ids), jnp.asarray(seg)))
    # Each document alone, one per row from position 0. What follows a document in its row cannot
    # reach it (causal), except as its last position's MTP next token: 0, the stand-in of a row's end.
    alone_ids = np.zeros((len(DOCS), max(DOCS)), np.int64)
    for d, tokens in enumerate(docs):
        alone_ids[d, :len(tokens)] = tokens
    alone, alone_mtp = (np.asarray(a) for a in plain_forward(model, jnp.asarray(alone_ids)))
    for r, row in enumerate(layout):
        for d, start in row:
            n = DOCS[d]
            for got, want in ((logits, alone), (mtp_logits, alone_mtp)):
                scale = np.abs(want[d, :n]).max()
                np.testing.assert_allclose(got[r, start:start + n], want[d, :n], rtol=0, atol=2e-5 * scale,
                                           err_msg=f"row {r}, document of {n} tokens at {start}")


def test_document_layout_restarts_positions_per_run():
    seg = np.array([[1, 1, 1, 0, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3]])
    docs = document_layout(jnp.asarray(seg))
    np.testing.assert_array_equal(docs.positions, [[0, 1, 2, 0, 0, 1, 0, 1], list(range(8))])
    np.testing.assert_array_equal(docs.run, [[0, 0, 0, 1, 2, 2, 3, 3], [0] * 8])


def test_document_not_starting_at_a_multiple_of_128_is_refused(model):
    seg = np.zeros((1, 256), np.int32)
    seg[0, :100], seg[0, 100:200] = 1, 2
    with pytest.raises(DataError, match=r"segment_ids row 0: document 2 starts at position 100, not a multiple of 128"):
        model.forward(np.zeros((1, 256), np.int32), segment_ids=seg)
