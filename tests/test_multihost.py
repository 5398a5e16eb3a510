"""Two processes x 4 CPU devices (jax.distributed over localhost, gloo collectives) give the
single-process logits, and the `v4jax --distributed` launch converts and generates like one process.

The test writes the tiny model's parameters to a file, starts two copies of this file
as worker processes that build one 8-device mesh (data=2 spans the processes, experts
split over data x expert, so tokens cross processes to reach their experts), place
every parameter shard from the file with `make_array_from_callback` and run the
forward; process 0 writes the gathered logits.
"""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

N_PROCESSES, LOCAL_DEVICES = 2, 4
MESH, RULES = "data=2,expert=4", "inference"
BATCH, SEQ = 4, 140


def flat_state(model):
    from flax import nnx

    return {".".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_single_process_logits(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from test_model import randomize
    from v4jax.config import ModelConfig
    from v4jax.model import Transformer

    cfg = ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    randomize(model)  # (the plain init has near-tied indexer scores that round-off alone can flip)
    ids = np.asarray(jax.random.randint(jax.random.key(2), (BATCH, SEQ), 0, cfg.vocab_size))
    np.savez(tmp_path / "params.npz", **flat_state(model))
    np.save(tmp_path / "ids.npy", ids)

    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}", JAX_PLATFORMS="cpu")
    workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(N_PROCESSES)]
    want = np.asarray(jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids)))  # meanwhile, the reference
    logs = []
    try:
        for w in workers:
            logs.append(w.communicate(timeout=400)[0])
    finally:
        for w in workers:
            w.kill()
    for i, (w, log) in enumerate(zip(workers, logs)):
        assert w.returncode == 0, f"process {i} failed:\n{log[-3000:]}"
    got = np.load(tmp_path / "logits.npy")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def launch(port: int, argv: list[str]) -> list[str]:
    """Run `v4jax --distributed ... argv` as N_PROCESSES processes; their stdout, in process order."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={LOCAL_DEVICES}", JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-m", "v4jax.cli", "--distributed", "--coordinator", f"localhost:{port}",
                               "--num-processes", str(N_PROCESSES), "--process-id", str(i), *argv], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(N_PROCESSES)]
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} of {argv[0]} failed:\n{err[-3000:]}"
    return [out for out, _ in outs]


@pytest.mark.slow
def test_distributed_launch_converts_and_generates_like_one_process(word_ckpt, tmp_path, capsys):
    """Every process reads only its devices' windows and saves its shards into one Orbax folder;
    generation then fetches the batch-split tokens across processes; only process 0 prints."""
    from v4jax import cli

    converted = tmp_path / "converted"
    launch(free_port(), ["convert", str(word_ckpt), str(converted), "--mesh", MESH])
    args = ["generate", "--ids", "5,9,200", "--ids", "7,7", "--max-new-tokens", "5", "--temperature", "0"]
    out = launch(free_port(), [*args, "--ckpt", str(converted), "--mesh", MESH])
    cli.main([*args, "--ckpt", str(word_ckpt)])  # one process, one device, straight from the published folder
    want = capsys.readouterr().out.splitlines()
    # completions are the "[i] ..." lines (gloo writes its own connection lines to the same stdout)
    got = [[line for line in o.splitlines() if re.match(r"\[\d\] ", line)] for o in out]
    assert got == [want, []] and len(want) == 2


def worker(process_id: int, port: int, folder: Path) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=N_PROCESSES,
                               process_id=process_id, local_device_ids=list(range(LOCAL_DEVICES)),
                               initialization_timeout=120)
    from flax import nnx
    from jax.experimental import multihost_utils

    from v4jax import sharding as sh
    from v4jax.config import ModelConfig
    from v4jax.model import Transformer

    assert jax.process_count() == N_PROCESSES and jax.device_count() == N_PROCESSES * LOCAL_DEVICES
    cfg = ModelConfig.from_json("configs/tiny.json", dtype="float32", quant_sim=False)
    mesh = sh.make_mesh(MESH)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    values = np.load(folder / "params.npz")

    def load(path, var):  # each process materialises only the shards its devices hold
        value, sharding = values[".".join(map(str, path))], var.get_value()
        return var.replace(jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx]))

    state = nnx.map_state(load, sh.state_shardings(abstract, mesh, RULES))
    model = nnx.merge(graphdef, state)
    ids = np.load(folder / "ids.npy")
    with sh.use_rules(mesh, RULES) as layout:
        ids = jax.make_array_from_callback(ids.shape, layout.sharding(("batch", None), ids.shape), lambda i: ids[i])
        logits = jax.jit(lambda m, x: m(x))(model, ids)
    assert not logits.is_fully_addressable  # each process holds half the batch
    logits = multihost_utils.process_allgather(logits, tiled=True)
    if process_id == 0:
        np.save(folder / "logits.npy", logits)
    jax.distributed.shutdown()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
