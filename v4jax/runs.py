"""Training run folders wherever a checkpoint folder is accepted (the command line, the lm-eval model).

A full fine-tuning run (`v4jax train --out RUN`) loads as its base with the run's latest step
restored over it (every variable the run saved); an adapter-only (LoRA) run as its base with its
adapters restored, unmerged. Both in the run's dtype. Any other folder loads as `load_pretrained`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from v4jax.checkpoint.loading import load_pretrained
from v4jax.errors import ConfigError
from v4jax.lora_export import read_run, restore_adapters
from v4jax.model import Transformer
from v4jax.sharding import use_rules
from v4jax.train import Checkpoints, training_run


def load_checkpoint(ckpt: str | Path, mesh=None, rules: str = "inference", *, dtype: str | None = None,
                    quant_sim: bool = True, remat: bool = False, moe_impl: str | None = None) -> Transformer:
    """The model of a published, converted or training run folder `ckpt`, placed by `rules` on `mesh`."""
    run = training_run(ckpt)
    if run is None:
        return load_pretrained(ckpt, mesh=mesh, rules=rules, dtype=dtype, quant_sim=quant_sim, remat=remat,
                               moe_impl=moe_impl)
    if dtype not in (None, run["dtype"]):
        raise ConfigError(f"{ckpt}: a training run in {run['dtype']}, not dtype {dtype}")
    model = load_pretrained(run["base"], mesh=mesh, rules=rules, dtype=run["dtype"], quant_sim=quant_sim, remat=remat,
                            moe_impl=moe_impl)
    with use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
        if read_run(Path(ckpt)) is not None:
            restore_adapters(model, Path(ckpt), mesh, rules)
        else:
            Checkpoints(ckpt).restore(model, None)
    return model
