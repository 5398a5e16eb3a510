"""LoRA adapters (v4jax.lora): exact no-op at init, one adapted projection against numpy,
adapter gradients over a quantised base vs the same base dequantised, the merged model,
and an adapter step on 8 simulated devices vs one."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from v4jax import lora, lora_export
from v4jax import sharding as sh
from v4jax.checkpoint import weights
from v4jax.config import LayerKind, ModelConfig
from v4jax.errors import ConfigError
from v4jax.linear import Linear
from v4jax.model import Transformer
from v4jax.low_rank import times
from v4jax.moe import MoE, ExpertWeights, expert_stack
from v4jax import train
from v4jax.train import lm_loss, make_optimizer, train_step

RAW = json.load(open("configs/tiny.json"))
RAW.update(num_hidden_layers=2, compress_ratios=[4, 128, 0], num_hash_layers=1)  # CSA + HCA, hash + bias
CFG = ModelConfig.from_dict(RAW).replace(dtype="float32", quant_sim=False)
QCFG = CFG.replace(quantized=True)  # FP8 codes + scales, FP4 experts
LORA = lora.LoRAConfig(rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS + ("indexer.*", "gate"))
IDS = np.asarray(jax.random.randint(jax.random.key(1), (2, 24), 0, CFG.vocab_size))


def randomise_b(model, seed=3):
    """Non-zero B everywhere, so the adapters change the output (fresh B is zero)."""
    for i, (_, m) in enumerate(lora.adapted_modules(model)):
        b = m.lora.b
        b.set_value(0.05 * jax.random.normal(jax.random.key(seed + i), b.get_value().shape, b.get_value().dtype))


def np_dequant_fp8(codes, scale):
    """E4M3 codes [o, i] times their [o/128, i/128] block scales, blockwise in numpy."""
    c = np.asarray(codes).astype(np.float32)
    s = np.repeat(np.repeat(np.asarray(scale, np.float32), 128, 0), 128, 1)[:c.shape[0], :c.shape[1]]
    return c * s


def np_dequant_fp4(packed, scale):
    """Packed E2M1 pairs [.., o, i/2] (low nibble first) times [.., o, i/32] scales."""
    p = np.asarray(packed).view(np.uint8)
    nib = np.stack([p & 15, p >> 4], -1).reshape(*p.shape[:-1], -1)
    mag = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)[nib & 7]
    return np.where(nib & 8, -mag, mag) * np.repeat(np.asarray(scale, np.float32), 32, -1)


jit_logits = jax.jit(lambda m, x: m(x))


@pytest.mark.slow
def test_fresh_adapters_leave_logits_bit_identical():
    model = Transformer(QCFG, rngs=nnx.Rngs(0))
    before = np.asarray(jit_logits(model, IDS))
    names = lora.apply_lora(model, LORA, jax.random.key(0))
    assert any(n.endswith("attn.wo_a") for n in names) and any(n.endswith("experts.w2") for n in names)
    assert any(n.endswith("indexer.wq_b") for n in names) and not any("compressor" in n for n in names)
    assert any(n.endswith("ffn.gate") for n in names)
    np.testing.assert_array_equal(np.asarray(jit_logits(model, IDS)), before)


def test_adapted_projections_match_numpy():
    """One FP8 linear and one FP4 expert stack (each expert with its pair) against numpy."""
    rngs = nnx.Rngs(0)
    lin = Linear(128, 256, QCFG, rngs, ("mlp", "embed"), fp8=True)
    experts = ExpertWeights(QCFG, 3, 64, 128, rngs, ("exp", "mlp_moe", "embed_moe"))
    cfg = lora.LoRAConfig(rank=4, alpha=2.0)
    for i, m in enumerate((lin, experts)):
        m.lora = lora.adapter_for(m, cfg, jnp.float32, jax.random.key(i))
        m.lora.b.set_value(jax.random.normal(jax.random.key(10 + i), m.lora.b.get_value().shape))
    x = np.asarray(jax.random.normal(jax.random.key(5), (5, 128)))
    a, b = np.asarray(lin.lora.a[...]), np.asarray(lin.lora.b[...])
    want = x @ np_dequant_fp8(lin.weight[...], lin.scale[...]).T + 0.5 * (x @ a.T) @ b.T
    np.testing.assert_allclose(np.asarray(lin(jnp.asarray(x))), want, rtol=2e-5, atol=2e-5)
    a, b = np.asarray(experts.lora.a[...]), np.asarray(experts.lora.b[...])
    folded = np_dequant_fp4(experts.weight[...], experts.scale[...]) + 0.5 * np.einsum("eor,eri->eoi", b, a)
    stack = expert_stack(experts.operand(), jnp.float32)  # a LowRank: the pairs stay factored
    for e in range(3):
        got = times(lora.dense_matmul, jax.tree.map(lambda m: m[e], stack))(jnp.asarray(x))
        np.testing.assert_allclose(np.asarray(got), x @ folded[e].T, rtol=2e-5, atol=2e-5)


def test_dropout_masks_each_scanned_layers_adapter_input_as_numpy_and_is_off_unseeded():
    """A projection stacked over 3 layers, run under a scan as the model's segments are: with dropout p
    each layer's adapter term is numpy's on its own masked input; p = 0, or no keys (evaluation), is
    the plain adapter bit for bit."""
    def stacked(dropout):
        lin = nnx.vmap(lambda k: Linear(64, 32, CFG, nnx.Rngs(params=k), ("mlp", "embed"), fp8=False),
                       in_axes=0, out_axes=0)(jax.random.split(jax.random.key(0), 3))
        lin.lora = lora.adapter_for(lin, lora.LoRAConfig(4, 8.0, dropout=dropout), jnp.float32, jax.random.key(1))
        lin.lora.b.set_value(jax.random.normal(jax.random.key(2), lin.lora.b.get_value().shape))
        return lin

    def scanned(lin):  # [layers, 5, 32]
        graphdef, state = nnx.split(lin)
        return np.asarray(jax.lax.scan(lambda c, s: (c, nnx.merge(graphdef, s)(x)), None, state)[1])

    x = np.asarray(jax.random.normal(jax.random.key(5), (5, 64)))
    plain = scanned(stacked(0.0))
    lin = stacked(0.25)
    np.testing.assert_array_equal(scanned(lin), plain)  # no keys: no dropout
    zero = stacked(0.0)
    lora.seed_dropout(zero, jax.random.key(7))
    np.testing.assert_array_equal(scanned(zero), plain)
    lora.seed_dropout(lin, jax.random.key(7))
    got = scanned(lin)
    keys = lin.lora.dropout_key.get_value()
    w, a, b = (np.asarray(v.get_value()) for v in (lin.weight, lin.lora.a, lin.lora.b))
    masks = [np.asarray(jax.random.bernoulli(keys[layer], 0.75, x.shape)) for layer in range(3)]
    assert all((masks[i] != masks[j]).any() for i in range(3) for j in range(i))  # a mask per layer
    for layer, mask in enumerate(masks):
        dropped = np.where(mask, x / 0.75, 0.0)
        want = x @ w[layer].T + 2.0 * (dropped @ a[layer].T) @ b[layer].T
        np.testing.assert_allclose(got[layer], want, rtol=2e-5, atol=2e-5)
    assert np.abs(got - plain).max() > 1e-2


def test_gate_adapter_starts_as_a_no_op_and_its_gradient_matches_finite_differences():
    """The router's [E, dim] weight adapted (folded): fresh, the MoE output is bit-identical; with B
    non-zero, the adapters' gradient of a projection of the output along a random direction equals
    the central difference of that projection (hash routing: the experts picked do not move)."""
    moe = MoE(CFG, LayerKind(ratio=0, hash_routed=True), nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, CFG.hidden_size))
    ids = jax.random.randint(jax.random.key(2), (2, 6), 0, CFG.vocab_size)
    r = np.asarray(jax.random.normal(jax.random.key(3), (2, 6, CFG.hidden_size)))
    run = nnx.jit(lambda m: m(x, ids))
    before = np.asarray(run(moe))
    assert [n for n, _ in lora.target_modules(moe, ("gate",))] == ["gate"]
    moe.gate.lora = lora.adapter_for(moe.gate, lora.LoRAConfig(4, 8.0), jnp.float32, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(run(moe)), before)
    moe.gate.lora.b.set_value(0.3 * jax.random.normal(jax.random.key(5), moe.gate.lora.b.get_value().shape))
    assert np.abs(np.asarray(run(moe)) - before).max() > 1e-3  # the adapted gate reweights the experts

    def objective(a, b):
        m = nnx.clone(moe)
        m.gate.lora.a.set_value(a)
        m.gate.lora.b.set_value(b)
        return jnp.sum(m(x, ids) * r)

    a, b = moe.gate.lora.a.get_value(), moe.gate.lora.b.get_value()
    ga, gb = jax.jit(jax.grad(objective, argnums=(0, 1)))(a, b)
    va, vb = (jax.random.normal(jax.random.key(6 + i), v.shape) for i, v in enumerate((a, b)))
    eps = 1e-3
    f = jax.jit(objective)
    numeric = (float(f(a + eps * va, b + eps * vb)) - float(f(a - eps * va, b - eps * vb))) / (2 * eps)
    analytic = float(np.sum(np.asarray(ga) * np.asarray(va)) + np.sum(np.asarray(gb) * np.asarray(vb)))
    assert abs(analytic) > 1e-2
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4)


def test_unknown_or_unhooked_targets_raise():
    model = nnx.eval_shape(lambda: Transformer(CFG, rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="'attn.wq_c': matches no module"):
        lora.target_modules(model, ("attn.wq_c",))
    with pytest.raises(ConfigError, match="compressor.wkv has no adapter hook"):
        lora.target_modules(model, ("compressor.wkv",))


def dequantised_copy(qmodel):
    """The same model with every kept-quantised weight decoded to float32 (numpy), adapters copied."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply_lora(model, LORA, jax.random.key(0))
    flat = {k: np.asarray(v) for k, v in weights.to_flat(qmodel).items()}
    for name in list(flat):
        owner, _, leaf = name.rpartition(".")
        if leaf == "weight" and f"{owner}.scale" in flat:
            w, s = flat[name], flat.pop(f"{owner}.scale")
            flat[name] = np_dequant_fp4(w, s) if w.dtype == np.int8 else np.stack(
                [np_dequant_fp8(wi, si) for wi, si in zip(w.reshape(-1, *w.shape[-2:]), s.reshape(-1, *s.shape[-2:]))]
            ).reshape(*w.shape[:-2], *w.shape[-2:])
    weights.load_flat(model, {k: jnp.asarray(v) for k, v in flat.items()})
    return model


def adapter_grads(model):
    grad_fn = nnx.grad(lambda m: lm_loss(m, IDS, np.ones_like(IDS), mtp_weight=0.3)[0],
                       argnums=nnx.DiffState(0, nnx.LoRAParam))
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grad_fn(model))}


@pytest.mark.slow
def test_adapter_grads_over_quantised_base_equal_dequantised_base_and_merge_matches():
    qmodel = Transformer(QCFG, rngs=nnx.Rngs(0))
    lora.apply_lora(qmodel, LORA, jax.random.key(0))
    randomise_b(qmodel)
    dmodel = dequantised_copy(qmodel)
    gq, gd = adapter_grads(qmodel), adapter_grads(dmodel)
    assert gq.keys() == gd.keys() and len(gq) == 2 * len(lora.adapted_modules(qmodel))
    assert all(k.endswith((".a", ".b")) for k in gq)
    for k in gq:
        # The indexer only selects entries (no gradient reaches it but through the indexer loss).
        assert ".indexer." in k or np.abs(gq[k]).max() > 0, k
        np.testing.assert_allclose(gq[k], gd[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # The merged model (adapters folded into dequantised float32 weights) gives the adapted logits.
    merged = Transformer(CFG, rngs=nnx.Rngs(1))
    weights.load_flat(merged, lora_export.merged_flat(qmodel)[0])
    adapted = np.asarray(jit_logits(qmodel, IDS))
    assert np.abs(adapted - np.asarray(jit_logits(Transformer(QCFG, rngs=nnx.Rngs(0)), IDS))).max() > 1e-3
    np.testing.assert_allclose(np.asarray(jit_logits(merged, IDS)), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_train_step_dropout_masks_follow_the_key_and_leave_the_model_without_dropout():
    """Through the model's scanned layers: the same step key gives the same step bit for bit (a
    resumed run redraws its masks from (seed, step)), another key another loss, no key the loss
    without dropout; the model keeps no mask keys, so evaluation runs without dropout."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoRAConfig(4, 8.0, dropout=0.5), jax.random.key(0))
    randomise_b(model)
    ones = np.ones_like(IDS)

    def step(key):
        m = nnx.clone(model)
        metrics = train_step(m, make_optimizer(m, wrt=nnx.LoRAParam), IDS, ones, wrt=nnx.LoRAParam, dropout_key=key)
        return float(metrics["loss"]), m

    loss, stepped = step(jax.random.key(1))
    again, stepped_again = step(jax.random.key(1))
    assert loss == again
    for (_, a), (_, b) in zip(lora.adapted_modules(stepped), lora.adapted_modules(stepped_again)):
        np.testing.assert_array_equal(a.lora.b.get_value(), b.lora.b.get_value())
    assert not any(hasattr(m.lora, "dropout_key") for _, m in lora.adapted_modules(stepped))
    plain = float(nnx.jit(lambda m: lm_loss(m, IDS, ones)[0])(model))
    assert step(jax.random.key(2))[0] != loss and abs(loss - plain) > 1e-4
    np.testing.assert_allclose(step(None)[0], plain, rtol=1e-6)


@pytest.mark.slow
def test_adapter_step_on_8_devices_equals_one_device():
    """fsdp=2 x expert=4 (training rules): the adapters are sharded with their base dims and experts;
    the adapter gradients and the step's loss match one device. A dequantised base: the tiny
    config's FP8 scale grids (one block) cannot split over fsdp."""
    def build():
        model = Transformer(CFG, rngs=nnx.Rngs(0))
        lora.apply_lora(model, LORA, jax.random.key(0))
        randomise_b(model)
        return model

    ids = np.asarray(jax.random.randint(jax.random.key(2), (8, 24), 0, CFG.vocab_size))
    grads = nnx.jit(nnx.grad(lambda m: lm_loss(m, ids, np.ones_like(ids))[0],
                             argnums=nnx.DiffState(0, nnx.LoRAParam)))
    ref = build()
    want = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads(ref))}
    ref_loss = train_step(ref, make_optimizer(ref, wrt=nnx.LoRAParam), ids, np.ones_like(ids), wrt=nnx.LoRAParam)
    mesh = sh.make_mesh("fsdp=2,expert=4")
    model = sh.shard_model(build(), mesh, "training")
    experts_b = next(m for n, m in lora.adapted_modules(model) if n.endswith("experts.w1")).lora.b.get_value()
    assert experts_b.sharding.spec[1] == "expert"  # [layers, E, out, r]
    with sh.use_rules(mesh, "training"):
        got = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads(model))}
        loss = train_step(model, make_optimizer(model, wrt=nnx.LoRAParam), ids, np.ones_like(ids), wrt=nnx.LoRAParam)
    assert got.keys() == want.keys()
    for k in want:
        scale = np.abs(want[k]).max()
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5 * scale + 1e-9, err_msg=str(k))
    np.testing.assert_allclose(float(loss["loss"]), float(ref_loss["loss"]), rtol=1e-5)
    np.testing.assert_allclose(weights.to_flat(model)["layers.0.ffn.experts.w1.lora.b"],
                               weights.to_flat(ref)["layers.0.ffn.experts.w1.lora.b"], atol=3e-5)  # lr 1e-5 Adam


@pytest.mark.slow
def test_cli_lora_train_resumes_saves_only_adapters_and_merge_gives_adapted_logits(word_ckpt, tmp_path, capsys):
    """Train with dropout and a gate adapter, resume, then use the run: eval scores it as the adapted
    model (no dropout), generate runs on it, merge folds it in, export refuses it unmerged."""
    from v4jax import cli, load_pretrained

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"w{(7 * i + 3 * j) % 500}" for j in range(60))}) + "\n"
                            for i in range(3)))
    run = tmp_path / "run"
    common = ["train", "--ckpt", str(word_ckpt), "--data", str(data), "--out", str(run), "--seq-len", "16",
              "--batch", "4", "--lr", "1e-2", "--save-every", "2", "--dtype", "float32", "--no-quant-sim",
              "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
              "--lora-targets", ",".join(lora.DEFAULT_TARGETS + ("gate",))]
    def steps():
        return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    cli.main(common + ["--steps", "2"])
    assert steps() == [1, 2]
    cli.main(common + ["--steps", "3"])  # resumes at step 2
    assert steps() == [1, 2, 3]
    model = load_pretrained(word_ckpt, dtype="float32", quant_sim=False)
    full = 3 * 4 * sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))  # f32 params + 2 moments
    lora.apply_lora(model, lora.LoRAConfig(4, 8.0, lora.DEFAULT_TARGETS + ("gate",), 0.1), jax.random.key(0))
    adapters = 3 * 4 * sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    saved = sum(f.stat().st_size for f in (run / "3").rglob("*") if f.is_file())
    assert adapters < saved < adapters + 2**18 < full / 4, (adapters, saved, full)  # adapters and moments only

    train.Checkpoints(run, wrt=nnx.LoRAParam).restore(model, make_optimizer(model, wrt=nnx.LoRAParam))
    ids = np.asarray(jax.random.randint(jax.random.key(4), (2, 20), 0, 512))
    adapted = np.asarray(jit_logits(model, ids))
    assert np.abs(model.layers[0][0].ffn.gate.lora.b.get_value()).max() > 0  # the gate adapter trained

    # The run itself is a checkpoint folder: eval scores the base + adapters (no dropout) ...
    (tmp_path / "ids.jsonl").write_text(json.dumps({"ids": ids[0].tolist()}) + "\n")
    cli.main(["eval", "--ckpt", str(run), "--data", str(tmp_path / "ids.jsonl"), "--out", str(tmp_path / "res.jsonl"),
              "--no-quant-sim"])
    logp = jax.nn.log_softmax(adapted[0, :-1].astype(np.float64), axis=-1)
    want = float(np.sum(np.take_along_axis(np.asarray(logp), ids[0, 1:, None], -1)))
    got = json.loads((tmp_path / "res.jsonl").read_text().splitlines()[0])["loglikelihood"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # ... generate decodes it greedily ...
    capsys.readouterr()
    cli.main(["generate", "--ckpt", str(run), "--ids", ",".join(map(str, ids[0])), "--max-new-tokens", "1",
              "--temperature", "0", "--json", "--no-quant-sim"])
    assert json.loads(capsys.readouterr().out.splitlines()[0])["tokens"] == [int(np.argmax(adapted[0, -1]))]
    # ... and export wants it merged first.
    with pytest.raises(SystemExit):
        cli.main(["export", str(run), str(tmp_path / "unmerged")])
    assert "v4jax merge --base" in capsys.readouterr().err

    cli.main(["merge", "--base", str(word_ckpt), "--adapter", str(run), str(tmp_path / "merged")])
    printed = capsys.readouterr().out
    assert "re-encoding error attn.wq_a:" in printed and "re-encoding error ffn.experts.w1:" in printed
    merged = load_pretrained(tmp_path / "merged", quant_sim=False)
    np.testing.assert_allclose(np.asarray(jit_logits(merged, ids)), adapted, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit):  # never over an existing output
        cli.main(["merge", "--base", str(word_ckpt), "--adapter", str(run), str(tmp_path / "merged")])
    cli.main(["export", str(tmp_path / "merged"), str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "model.safetensors.index.json").is_file()
    cli.main(["merge", "--base", str(word_ckpt), "--adapter", str(run), "--peft", str(tmp_path / "peft")])
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["lora_alpha"] == 8.0


@pytest.mark.slow
def test_peft_export_loads_onto_hf_port_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from bench.common import float_copy
    from v4jax import load_pretrained
    from v4jax.checkpoint import write_random_checkpoint

    published = write_random_checkpoint(ModelConfig.from_dict(RAW), tmp_path / "published")
    model = load_pretrained(published, dtype="float32", quant_sim=False)
    lora.apply_lora(model, LORA, jax.random.key(0))
    randomise_b(model)
    lora_export.write_peft(model, tmp_path / "peft")
    hf = AutoModelForCausalLM.from_pretrained(float_copy(published, tmp_path / "float"), dtype=torch.float32).eval()
    ids = IDS[:1]
    with torch.no_grad():
        base_hf = hf(torch.as_tensor(ids)).logits.numpy()
        tuned = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
        tuned_hf = tuned(torch.as_tensor(ids)).logits.numpy()
    adapted = np.asarray(jit_logits(model, ids))
    assert np.abs(adapted - base_hf).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(tuned_hf, adapted, rtol=2e-4, atol=2e-4)
