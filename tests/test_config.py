"""Config loading: published files load unchanged; bad files name the offending key."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v4jax.config import ConfigError, ModelConfig

PUBLISHED = ["flash", "pro", "flash-base", "pro-base"]


@pytest.mark.parametrize("name", PUBLISHED + ["tiny", "tiny-pro-base"])
def test_published_and_tiny_configs_load_and_round_trip(name):
    cfg = ModelConfig.from_json(f"configs/{name}.json")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert len(cfg.compress_ratios) == cfg.num_hidden_layers + 1


def test_flash_and_pro_values_match_the_spec():
    flash, pro = ModelConfig.from_json("configs/flash.json"), ModelConfig.from_json("configs/pro.json")
    assert (flash.hidden_size, flash.num_hidden_layers, flash.n_routed_experts, flash.index_topk) == (4096, 43, 256, 512)
    assert (pro.hidden_size, pro.num_hidden_layers, pro.n_routed_experts, pro.index_topk) == (7168, 61, 384, 1024)
    assert [flash.layer_kind(i).ratio for i in (0, 1, 2, 3, 42, 43)] == [0, 0, 4, 128, 4, 0]
    assert [pro.layer_kind(i).ratio for i in (0, 1, 2, 3, 60, 61)] == [128, 128, 4, 128, 4, 0]
    assert [flash.layer_kind(i).hash_routed for i in (2, 3)] == [True, False]
    assert ModelConfig.from_json("configs/flash-base.json").scale_dtype == "F32"
    assert flash.scale_dtype == "F8_E8M0"


def test_layer_plan_scans_flash_and_pro_as_prefix_plus_pairs():
    for name, reps in [("flash", 20), ("pro", 29)]:
        plan = ModelConfig.from_json(f"configs/{name}.json").layer_plan
        assert [(s.first, len(s.unit), s.reps) for s in plan] == [(0, 1, 2), (2, 1, 1), (3, 2, reps)]


def _raw(**changes):
    raw = json.load(open("configs/tiny.json"))
    raw.update(changes)
    return raw


@pytest.mark.parametrize("changes, key", [
    ({"hiden_size": 3}, "hiden_size"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"compress_ratios": [0, 4]}, "compress_ratios"),
    ({"o_groups": 3}, "o_groups"),
    ({"index_head_dim": 96}, "index_head_dim"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"expert_dtype": "int4"}, "expert_dtype"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": None}}, "weight_block_size"),
])
def test_bad_config_names_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        ModelConfig.from_dict(_raw(**changes), source="cfg.json")


def test_missing_key_is_named(tmp_path):
    raw = _raw()
    del raw["q_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"config.json: missing key 'q_lora_rank'"):
        ModelConfig.from_json(tmp_path)


# ---------------------------------------------------------------------------- hardening
@pytest.mark.parametrize("key, value, why", [
    ("hidden_size", "128", "must be an integer"),
    ("hidden_size", None, "must be an integer"),
    ("hidden_size", 128.0, "must be an integer"),
    ("num_attention_heads", True, "must be an integer"),  # bool is an int subclass in Python
    ("num_attention_heads", 0, "must be positive"),
    ("vocab_size", 0, "must be positive"),
    ("vocab_size", -5, "must be positive"),
    ("hidden_size", 0, "must be positive"),
    ("o_groups", 0, "must be positive"),
    ("index_n_heads", 0, "must be positive"),
    ("n_routed_experts", 0, "must be positive"),
    ("hc_mult", 0, "must be positive"),
    ("index_topk", False, "must be an integer"),
    ("num_hash_layers", -1, "must not be negative"),
    ("rope_theta", "1e4", "must be a finite number"),
    ("rms_norm_eps", True, "must be a finite number"),
    ("compress_rope_theta", 1, "must exceed 1"),
    ("compress_ratios", [0, 4, 128, 4, 128, 4, True], "must be a list of integers"),
    ("index_head_dim", 32, "must be at least qk_rope_head_dim"),
])
def test_wrong_type_or_impossible_size_names_the_key_and_why(key, value, why):
    with pytest.raises(ConfigError, match=rf"cfg\.json: key '{key}' = .*: {why}"):
        ModelConfig.from_dict(_raw(**{key: value}), source="cfg.json")


@pytest.mark.parametrize("field, value, why", [
    ("factor", "16", "must be a finite number"), ("original_max_position_embeddings", 65536.5, "positive integer"),
    ("beta_slow", 0, "must be positive"), ("factor", 0.5, "must be >= 1"),
])
def test_bad_rope_scaling_field_is_named(field, value, why):
    raw = _raw()
    raw["rope_scaling"] = {**raw["rope_scaling"], field: value}
    with pytest.raises(ConfigError, match=rf"key 'rope_scaling\.{field}' = .*{why}"):
        ModelConfig.from_dict(raw, source="cfg.json")


def test_configs_built_in_python_are_checked_too():
    cfg = ModelConfig.from_dict(_raw())
    with pytest.raises(ConfigError, match=r"key 'hidden_size' = '128': must be an integer"):
        cfg.replace(hidden_size="128")
    with pytest.raises(ConfigError, match=r"key 'quantized' = 1: must be true or false"):
        cfg.replace(quantized=1)


def test_unreadable_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"vocab_size": 5')
    with pytest.raises(ConfigError, match=r"config\.json: cannot read config: JSONDecodeError"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"config\.json: cannot read config: UnicodeDecodeError"):
        ModelConfig.from_json(tmp_path)


def test_all_rotary_indexer_runs_and_matches_the_oracle():
    """index_head_dim == qk_rope_head_dim (the indexer's non-rotary part is empty) is a config the
    reference and HF's port run; so does v4jax, with the oracle's logits."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import oracle
    from test_model import oracle_params, randomize, rel_err
    from v4jax.model import Transformer

    raw = _raw(index_head_dim=64, num_hidden_layers=2, compress_ratios=[4, 0, 0], num_hash_layers=1,
               index_topk=2)
    model = Transformer(ModelConfig.from_dict(raw, dtype="float32", quant_sim=False), rngs=nnx.Rngs(0))
    randomize(model)
    ids = np.random.default_rng(0).integers(0, raw["vocab_size"], (1, 24))
    logits = model.forward(jnp.asarray(ids))[0]
    ref = oracle.forward(raw, oracle_params(model), ids)["logits"]
    assert rel_err(logits, ref) < 1e-5


# ---------------------------------------------------------------------------- published bookkeeping keys
def test_position_limit_and_special_token_ids_are_config_fields():
    flash = ModelConfig.from_json("configs/flash.json")
    assert (flash.max_position_embeddings, flash.bos_token_id, flash.eos_token_id) == (1048576, 0, 1)
    several = ModelConfig.from_dict(_raw(eos_token_id=[1, 7], bos_token_id=None))
    assert several.eos_token_ids == (1, 7) and several.bos_token_id is None
    assert several.to_dict()["eos_token_id"] == [1, 7] and "bos_token_id" not in several.to_dict()
    raw = _raw()
    for key in ("max_position_embeddings", "bos_token_id", "eos_token_id"):
        del raw[key]
    bare = ModelConfig.from_dict(raw)
    assert (bare.max_position_embeddings, bare.bos_token_id, bare.eos_token_ids) == (None, None, ())


@pytest.mark.parametrize("key, value, why", [
    ("eos_token_id", 512, r"must be a token id in \[0, 512\) \(the vocabulary\) or a non-empty list"),
    ("eos_token_id", [1, 512], r"must be a token id in \[0, 512\)"),
    ("eos_token_id", [], r"must be a token id .* or a non-empty list of them"),
    ("eos_token_id", "1", r"must be a token id"),
    ("bos_token_id", -1, r"must be a token id in \[0, 512\) \(the vocabulary\)"),
    ("bos_token_id", True, r"must be a token id"),
    ("max_position_embeddings", 0, "must be a positive integer"),
    ("max_position_embeddings", "4096", "must be a positive integer"),
    ("max_position_embeddings", 4096.0, "must be a positive integer"),
])
def test_bad_position_limit_or_token_id_names_the_key(key, value, why):
    with pytest.raises(ConfigError, match=rf"cfg\.json: key '{key}' = .*: {why}"):
        ModelConfig.from_dict(_raw(**{key: value}), source="cfg.json")
    with pytest.raises(ConfigError, match=rf"key '{key}'"):  # a config built in Python too
        ModelConfig.from_dict(_raw()).replace(**{key: tuple(value) if isinstance(value, list) else value})


def test_random_checkpoint_config_carries_what_the_published_file_does(tmp_path):
    from v4jax.checkpoint import write_random_checkpoint

    raw = _raw(eos_token_id=[1, 5])
    write_random_checkpoint(ModelConfig.from_dict(raw), tmp_path / "ckpt")
    written = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    for key in ("max_position_embeddings", "bos_token_id", "eos_token_id", "model_type", "architectures",
                "torch_dtype", "vocab_size", "compress_ratios", "rope_scaling", "quantization_config"):
        assert written[key] == raw[key], key


@pytest.mark.slow
def test_hugging_face_reads_the_config_v4jax_writes():
    """HF transformers' AutoConfig (its DeepSeek-V4 port) takes the file `to_dict` writes."""
    transformers = pytest.importorskip("transformers")
    import tempfile

    cfg = ModelConfig.from_dict(_raw())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg.to_dict()))
        hf = transformers.AutoConfig.from_pretrained(tmp)
    assert type(hf).__name__ == "DeepseekV4Config"
    assert (hf.max_position_embeddings, hf.bos_token_id, hf.eos_token_id, hf.vocab_size) == (4096, 0, 1, 512)


# ---------------------------------------------------------------------------- sizes that would hang
def _plan_by_search(kinds):
    """Every cut of the layers into repeated units of 1 or 2 kinds, searched exhaustively: the
    fewest traced blocks, ties to units of 1 and then to fewer repetitions (the rule layer_plan keeps)."""
    best = [(0, ())] + [(1 << 30, ())] * len(kinds)
    for end in range(1, len(kinds) + 1):
        for p in (1, 2):
            for reps in range(1, end // p + 1):
                first = end - reps * p
                if kinds[first:end] != kinds[first:first + p] * reps:
                    break
                if best[first][0] + p < best[end][0]:
                    best[end] = (best[first][0] + p, best[first][1] + ((first, tuple(kinds[first:first + p]), reps),))
    return best[-1][1]


@settings(max_examples=60, deadline=None)
@given(ratios=st.lists(st.sampled_from([0, 4, 128]), min_size=1, max_size=24), hashed=st.integers(0, 3))
def test_layer_plan_is_the_fewest_traced_blocks(ratios, hashed):
    cfg = ModelConfig.from_dict(_raw(num_hidden_layers=len(ratios), compress_ratios=ratios + [0],
                                     num_hash_layers=min(hashed, len(ratios))))
    kinds = [cfg.layer_kind(i) for i in range(len(ratios))]
    assert [(s.first, s.unit, s.reps) for s in cfg.layer_plan] == list(_plan_by_search(kinds))


def test_many_layers_plan_in_linear_time_and_a_billion_experts_are_refused_unlisted():
    n = 20000  # a 60 KB config.json; the exhaustive search takes hours
    cfg = ModelConfig.from_dict(_raw(num_hidden_layers=n, compress_ratios=[4, 128] * (n // 2) + [0]))
    assert [(s.first, len(s.unit), s.reps) for s in cfg.layer_plan] == [(0, 1, 1), (1, 1, 1), (2, 2, n // 2 - 1)]
    with pytest.raises(ConfigError, match=r"key 'n_routed_experts' = 1000000000: with num_hidden_layers = 6 the "
                                          r"checkpoint would list about 42,000,000,336 tensors, more than v4jax reads"):
        ModelConfig.from_dict(_raw(n_routed_experts=10**9), source="cfg.json")


JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5)),
                    lambda inner: st.one_of(st.lists(inner, max_size=3),
                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)
NESTED = ["quantization_config.weight_block_size", "quantization_config.scale_fmt", "quantization_config.fmt",
          "rope_scaling.factor", "rope_scaling.type", "rope_scaling.beta_slow",
          "rope_scaling.original_max_position_embeddings"]


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(_raw()) + NESTED), JSON), min_size=1, max_size=3))
def test_any_json_value_for_any_key_loads_or_is_a_config_error(edits):
    raw = _raw()
    for key, value in edits:
        outer, _, inner = key.partition(".")
        if inner:
            raw[outer] = {**raw[outer], inner: value} if isinstance(raw.get(outer), dict) else raw.get(outer)
        else:
            raw[key] = value
    try:
        ModelConfig.from_dict(raw).layer_plan
    except ConfigError:
        pass
