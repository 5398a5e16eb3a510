"""What every verb shares: argument types that refuse bad values at parse time, user paths made
absolute once, the cheap checks of a checkpoint folder, and loading a model onto a mesh.

Wherever a checkpoint folder is accepted, a `v4jax train` run folder is too: its `run.json`
names the base checkpoint (config, tokenizer and the weights nothing trained), and the model
is the base with the run's latest step restored over it (`load_model`, `checkpoint_config`).

An argument type raises `argparse.ArgumentTypeError`, which the parser turns into the one-line
`v4jax VERB: argument --name: ...` usage error (exit 2).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import math
import os
from pathlib import Path

from v4jax.config import MOE_IMPLS, ModelConfig
from v4jax.errors import CheckpointError, V4jaxError

CONFIGS = importlib.resources.files("v4jax.configs")  # configs/, installed as package data
PUBLISHED_INDEX = "model.safetensors.index.json"


class UsageError(V4jaxError):
    """Options that contradict each other or the checkpoint (exit 2, like a bad argument)."""


# ---------------------------------------------------------------------------- numbers
def _number(kind, value: str, ok, need: str):
    try:
        x = kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {need}, got {value!r}") from None
    if not ok(x):
        raise argparse.ArgumentTypeError(f"expected {need}, got {value!r}")
    return x


def int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer >= low (and <= high)."""
    need = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"

    def parse(value: str) -> int:
        return _number(int, value, lambda x: x >= low and (high is None or x <= high), need)

    parse.__name__ = need
    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)
prng_seed = int_at_least(0, 2**63 - 1)  # what jax.random.key takes


def positive_float(value: str) -> float:
    return _number(float, value, lambda x: math.isfinite(x) and x > 0, "a finite number > 0")


def nonnegative_float(value: str) -> float:
    return _number(float, value, lambda x: math.isfinite(x) and x >= 0, "a finite number >= 0")


def top_p(value: str) -> float:
    return _number(float, value, lambda x: 0 < x <= 1, "a probability in (0, 1]")


def token_id_list(value: str) -> list[int]:
    """ "1,2,3" -> [1, 2, 3]: non-negative integers, no empty items (the vocabulary bound is checked
    against the checkpoint's config before its model loads)."""
    items = [s.strip() for s in value.split(",")]
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected token ids such as 1,2,3, got {value!r}")
    bad = next((s for s in items if not (s.isascii() and s.isdigit())), None)
    if bad is not None:
        raise argparse.ArgumentTypeError(f"expected token ids such as 1,2,3; {bad!r} in {value!r} is not a "
                                         "non-negative integer")
    return [int(s) for s in items]


# ---------------------------------------------------------------------------- paths
def user_path(value: str) -> Path:
    """A path as given (relative to the working directory, ~ expanded), made absolute once here:
    Orbax and the staging folders need absolute paths."""
    if not value:
        raise argparse.ArgumentTypeError("empty path")
    return Path(os.path.expanduser(value)).absolute()


def existing_dir(value: str) -> Path:
    path = user_path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: not a folder")
    return path


def existing_file(value: str) -> Path:
    path = user_path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{path}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a folder, not a file")
    return path


def new_dir(value: str) -> Path:
    """A folder to create: refused if anything (even a dangling link) is there, or if an existing
    ancestor is not a folder."""
    path = user_path(value)
    if path.exists() or path.is_symlink():
        raise argparse.ArgumentTypeError(f"{path}: already exists; refusing to overwrite")
    _check_ancestors(path)
    return path


def dir_to_use(value: str) -> Path:
    """A folder that may exist already (e.g. a training run to resume) or is created."""
    path = user_path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: exists and is not a folder")
    _check_ancestors(path)
    return path


def new_file(value: str) -> Path:
    """A file to write (replaced if it is there), in a folder that exists."""
    path = user_path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path}: is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent}: no such folder")
    return path


def _check_ancestors(path: Path) -> None:
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{parent}: not a folder, so {path} cannot be created in it")


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_config(ckpt: Path) -> ModelConfig:
    """The config of a published or converted checkpoint folder, or of a training run's base, read
    without its weights."""
    from v4jax.checkpoint import converted_config
    from v4jax.train import training_run

    run = training_run(ckpt)
    if run is not None:
        return checkpoint_config(Path(run["base"])).replace(dtype=run["dtype"])
    if (ckpt / PUBLISHED_INDEX).is_file():
        return ModelConfig.from_json(ckpt / "config.json")
    try:
        return converted_config(ckpt)
    except CheckpointError:
        raise CheckpointError(f"{ckpt}: not a checkpoint folder (neither a published one with {PUBLISHED_INDEX} "
                              "nor a converted v4jax one)") from None


def position_limit(ckpt: Path) -> int | None:
    """The checkpoint's max_position_embeddings (None where its config gives none): the longest
    sequence the published model is meant to run."""
    return checkpoint_config(ckpt).max_position_embeddings


def mesh_of(spec: str | None):
    """The mesh a --mesh spec names over the available devices (None: one device); a spec needing
    more devices than exist is a MeshError (a usage error), raised before anything loads."""
    if spec is None:
        return None
    from v4jax.sharding import make_mesh

    return make_mesh(spec)


def check_batch(mesh, rules: str, batch: int, what: str) -> None:
    """Refuse (ShardingError, a usage error) a batch the rules cannot split over the mesh, before
    the model loads rather than when the first step is traced."""
    if mesh is not None:
        from v4jax.sharding import Layout, get_rules

        Layout(mesh, get_rules(rules)).spec(("batch",), (batch,), what)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The runtime switches of every verb that loads a model (read by `load_model`)."""
    p.add_argument("--dtype", choices=("bfloat16", "float32"),
                   help="compute and parameter dtype (default: bfloat16 for a published folder, what a converted "
                        "one was converted with)")
    p.add_argument("--no-quant-sim", dest="quant_sim", action="store_false",
                   help="turn off the reference's quantisation-aware steps (FP8 activations and KV, FP4 indexer); "
                        "with --dtype float32 this reproduces fp32 reference numbers")
    p.add_argument("--moe-impl", choices=MOE_IMPLS,
                   help="how the routed experts are multiplied (default: the backend's choice; every choice gives "
                        "the same result)")


def data_parallel_size(mesh, rules: str = "inference") -> int:
    """How many ways `rules` split a batch over `mesh` (1 without a mesh): batch sizes are multiples of it."""
    if mesh is None:
        return 1
    from v4jax.sharding import get_rules

    axes = get_rules(rules)["batch"]
    axes = (axes,) if isinstance(axes, str) else axes or ()
    return math.prod(mesh.shape[a] for a in axes if a in mesh.shape)


def load_model(ckpt: Path, mesh, rules: str = "inference", remat: bool = False, *, dtype: str | None = None,
               quant_sim: bool = True, moe_impl: str | None = None):
    """(model, context): the model placed by `rules` on `mesh`, and a context that runs it there
    under those rules (a no-op context without a mesh). `dtype`, `quant_sim`, `moe_impl` as `add_model_options`.
    A training run folder, full or adapter-only, loads through `v4jax.runs.load_checkpoint`."""
    from v4jax.runs import load_checkpoint
    from v4jax.sharding import use_rules
    from v4jax.train import training_run

    run = training_run(ckpt)
    if run is not None and dtype not in (None, run["dtype"]):
        raise UsageError(f"--ckpt {ckpt}: a training run in {run['dtype']}, not --dtype {dtype}")
    model = load_checkpoint(ckpt, mesh, rules, dtype=dtype, quant_sim=quant_sim, remat=remat, moe_impl=moe_impl)
    return model, use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()


def export_source(src: Path):
    """(source, cfg) for `v4jax.checkpoint.export`: a converted folder as itself (cfg None); a
    training run as its model's flat weights and config, re-encoded to the published layout."""
    from v4jax.checkpoint import weights
    from v4jax.lora_export import read_run
    from v4jax.train import training_run

    if training_run(src) is None:
        return src, None
    if read_run(src) is not None:
        raise UsageError(f"{src}: an adapter-only (LoRA) run; `v4jax merge --base BASE --adapter {src} OUT` "
                         "folds it into its base, then export OUT")

    model, _ = load_model(src, None)
    return weights.to_flat(model), model.cfg
