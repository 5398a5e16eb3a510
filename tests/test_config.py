"""Config loading: published files load unchanged; bad files name the offending key."""

import json

import pytest

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
