"""The memory plan: exact bytes at rest, compiled temporaries, mesh choice, the command line."""

import json

import jax
import pytest
from flax import nnx

from v4jax import sharding as sh
from v4jax.cli import main as cli_main
from v4jax.cli.main import build_parser
from v4jax.config import ModelConfig
from v4jax import memory_plan as plan


def test_reduced_depth_keeps_every_layer_kind_and_the_mtp_block():
    cfg = ModelConfig.from_json("configs/flash.json")
    small = plan.reduced_depth(cfg, 2)
    assert small.num_hidden_layers == 7  # [swa-hash] x2, [csa-hash] x1, [hca, csa] x2
    assert {k.short() for s in small.layer_plan for k in s.unit} == {k.short() for s in cfg.layer_plan for k in s.unit}
    assert small.compress_ratios[-1] == cfg.compress_ratios[-1]


def test_bytes_at_rest_are_the_sum_of_shard_shapes():
    cfg = ModelConfig.from_json("configs/flash.json", quantized=True)
    abstract = plan.abstract_model(cfg)
    mesh = sh.make_mesh("expert=8")
    params, cache = plan.at_rest(abstract, mesh, "inference", batch=1, context=131072)
    state = nnx.state(abstract)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    experts = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract, lambda p, _: "experts" in p)))
    assert params == total - experts + experts // 8  # everything else is replicated on this mesh
    assert 0.9e9 < cache < 1.0e9  # 128K tokens of Flash's compressed cache, one sequence, replicated


def test_best_mesh_skips_meshes_the_rules_refuse():
    cfg = ModelConfig.from_json("configs/tiny.json").replace(n_routed_experts=6)
    best, params, cache = plan.best_mesh(plan.abstract_model(cfg), 8, "inference", 1, 4096)
    assert 6 % best.shape["expert"] == 0  # 6 experts never split 4 or 8 ways
    # quant_sim: F = 64 over tensor=2 would straddle the 128-wide FP8 activation blocks
    assert best.shape["tensor"] == 1 and best.shape["expert"] * best.shape["sequence"] == 8
    with pytest.raises(sh.ShardingError):
        plan.at_rest(plan.abstract_model(cfg), sh.make_mesh("expert=4,sequence=2"), "inference", 1, 4096)


@pytest.mark.slow
def test_plan_command_prints_params_cache_and_compiled_temporaries(capsys):
    args = build_parser().parse_args(["plan", "--models", "configs/tiny.json", "--weights", "bfloat16",
                                      "--contexts", "1024", "--devices", "8", "--chunk", "64", "--temp-reps", "1"])
    (p,) = args.run(args)
    assert p.devices == 8 and p.context == 1024
    assert p.temp_depth == plan.reduced_depth(ModelConfig.from_json("configs/tiny.json"), 1).num_hidden_layers
    assert p.prefill.temporaries > 0 and p.decode.temporaries > 0
    assert p.peak == p.params + p.cache + max(p.prefill.temporaries, p.decode.temporaries)
    out = capsys.readouterr().out
    assert f"| tiny | bfloat16 | 1K | 8 | {p.mesh} |" in out


def test_v4jax_plan_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit):
        cli_main(["plan", "--help"])
    assert "--fit" in capsys.readouterr().out


def test_lora_plan_bytes_at_rest_split_base_and_adapters():
    cfg = ModelConfig.from_json("configs/tiny.json", quantized=True)
    p = plan.plan_lora(cfg, 8, 4, 256, compile_steps=False)
    abstract = plan.lora_abstract(cfg, 4)
    adapters = nnx.state(abstract, nnx.LoRAParam)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(abstract)))
    lora_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapters))
    assert p.devices == 8 and p.mesh == "expert=8"  # the fewest bytes per device: experts split 8 ways
    expert_lora = sum(x.size * x.dtype.itemsize for x in
                      jax.tree.leaves(nnx.state(abstract, nnx.All(nnx.LoRAParam, lambda path, _: "experts" in path))))
    assert p.adapters == 3 * (lora_bytes - expert_lora + expert_lora // 8)  # + two moments each
    assert p.params < total - lora_bytes and p.peak == p.params + p.adapters


def test_lora_plan_tensor_degree_shares_each_sequence_over_that_many_devices():
    cfg = ModelConfig.from_json("configs/flash.json", quantized=True)  # tiny's FP8 scale grids are too small
    meshes = plan.training_meshes(cfg, 8, tensor=4)
    assert meshes and all(m.shape["tensor"] == 4 and m.size == 8 for m in meshes)
    assert plan.training_meshes(cfg, 8, tensor=3) == []
    p = plan.plan_lora(cfg, 8, 4, 256, tensor=2, compile_steps=False)
    assert p.devices == 8 and "tensor=2" in p.mesh
    assert plan.plan_lora(cfg, 6, 4, 256, tensor=4, compile_steps=False) is None
    args = build_parser().parse_args(["plan", "--lora-rank", "16", "--lora-tensor", "1", "8"])
    assert args.lora_tensor == [1, 8]


def test_lora_step_bytes_falling_with_depth_compile_the_full_depth_instead(monkeypatch):
    """A deeper reduced copy needing fewer bytes (a one-repetition segment scheduled differently) gives no
    line to extrapolate along, which could even go negative: the full depth is compiled."""
    cfg = ModelConfig.from_json("configs/tiny.json")
    compiled = []

    def fake(c, mesh, tokens, rank):
        compiled.append(c.num_hidden_layers)
        return plan.Step(10, 1, 1, {1: 500, 2: 300}.get(len(compiled), 400))

    monkeypatch.setattr(plan, "compile_train_step", fake)
    step, depths = plan.extrapolated_train_step(cfg, None, 256, 4, reps=1)
    assert compiled == [plan.reduced_depth(cfg, 1).num_hidden_layers, plan.reduced_depth(cfg, 2).num_hidden_layers,
                        cfg.num_hidden_layers]
    assert depths == (cfg.num_hidden_layers,) and step.temporaries == 400


def test_plan_token_counts_take_k_and_m_suffixes_as_the_readme_writes_them():
    args = build_parser().parse_args(["plan", "--lora-rank", "16", "--lora-tokens", "8K", "64K", "1M", "65536",
                                      "--contexts", "128K"])
    assert args.lora_tokens == [("8K", 8192), ("64K", 65536), ("1M", 1048576), ("65536", 65536)]
    assert args.contexts == [("128K", 131072)]
    for bad in ("8X", "5M", "0K", "K"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["plan", "--lora-tokens", bad])


@pytest.mark.slow
def test_plan_command_lora_rows_compile_the_adapter_step(capsys):
    args = build_parser().parse_args(["plan", "--models", "configs/tiny.json", "--lora-rank", "4",
                                      "--lora-tokens", "256", "--devices", "8", "--temp-reps", "1"])
    (p,) = args.run(args)
    assert p.step.temporaries > 0 and p.peak == p.params + p.adapters + p.step.temporaries
    assert f"| tiny | quantized | 4 | 256 | 8 | {p.mesh} |" in capsys.readouterr().out


@pytest.mark.slow
def test_lora_step_bytes_extrapolated_from_two_reduced_depths_match_the_full_depth():
    """Eight window layers, seven in one scanned segment: the training step's temporaries grow with
    the scan iterations (one residual stream kept per iteration); extrapolated from 1 and 2
    repetitions per segment they are the full depth's, which one reduced-depth copy underestimates."""
    raw = json.load(open("configs/tiny.json"))
    raw.update(num_hidden_layers=8, compress_ratios=[0] * 9, num_hash_layers=1)
    cfg = ModelConfig.from_dict(raw).replace(quantized=True)
    mesh = sh.make_mesh("", devices=jax.devices()[:1])
    step, depths = plan.extrapolated_train_step(cfg, mesh, 1024, 4)
    assert depths == (2, 3) and plan.scan_steps(cfg) == 8
    full = plan.compile_train_step(cfg, mesh, 1024, 4)
    one = plan.compile_train_step(plan.reduced_depth(cfg, 1), mesh, 1024, 4)
    assert full.temporaries > one.temporaries
    assert abs(step.temporaries - full.temporaries) < 0.05 * full.temporaries, (step, full, one)
