"""The `v4jax` command line: one subcommand per function in COMMANDS.

Adding a subcommand is one function that registers its parser on the subparsers
object and sets `run` (called with the parsed arguments), appended to COMMANDS.
Heavier library imports (Orbax, tokenizers, the checkpoint package) happen inside `run`,
so a command loads only what it uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="published FP8/FP4 safetensors folder -> Orbax checkpoint",
                       description="Validate a published checkpoint folder and convert it to an Orbax "
                                   "checkpoint of the model layout (atomically: DST appears only when complete).")
    p.add_argument("src", help="published checkpoint folder (config.json, index, safetensors shards)")
    p.add_argument("dst", help="output folder (must not exist)")
    p.add_argument("--mesh", help='place leaves on this mesh while converting, e.g. "expert=4,tensor=2"')
    p.add_argument("--keep-quantized", action="store_true", help="keep FP8/FP4 codes + float32 scales")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="dtype of dequantised weights and BF16 tensors (default bfloat16)")

    def run(args: argparse.Namespace) -> None:
        from v4jax.checkpoint import convert

        sharding_for = _mesh_sharding(args) if args.mesh else None
        convert(args.src, args.dst, keep_quantized=args.keep_quantized, dtype=args.dtype, sharding_for=sharding_for)

    p.set_defaults(run=run)


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="converted Orbax checkpoint -> published safetensors folder",
                       description="Write a converted checkpoint back in the published layout (same names, "
                                   "dtypes, file split and index; an unmodified one comes back byte for byte).")
    p.add_argument("src", help="converted checkpoint folder")
    p.add_argument("dst", help="output folder (must not exist)")

    def run(args: argparse.Namespace) -> None:
        from v4jax.checkpoint import export

        export(args.src, args.dst)

    p.set_defaults(run=run)


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="perplexity or log-likelihoods of a JSON Lines data set",
                       description="Records with 'ids' or 'text' -> token perplexity (rolling windows); records "
                                   "with 'context' and 'continuation' -> one log-likelihood line per record.")
    p.add_argument("--ckpt", required=True, help="published or converted checkpoint folder")
    p.add_argument("--data", required=True, help="JSON Lines file")
    p.add_argument("--max-len", type=int, default=2048, help="window length for perplexity")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mesh", help='e.g. "data=2,expert=4" (default: one device)')

    def run(args: argparse.Namespace) -> None:
        import json

        from v4jax import data, evaluate

        model, tokenizer, on_mesh = _load(args.ckpt, args.mesh)
        records = data.read_records(args.data)
        with on_mesh:
            if records and "context" in records[0]:
                requests = data.scoring_requests(args.data, tokenizer)
                for score in evaluate.loglikelihood(model, requests, args.batch):
                    print(json.dumps({"loglikelihood": score.loglikelihood, "is_greedy": score.is_greedy}))
            else:
                documents = data.documents(args.data, tokenizer)
                print(json.dumps(evaluate.perplexity(model, documents, args.max_len, args.batch)))

    p.set_defaults(run=run)


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fine-tune on a JSON Lines data set, with Orbax save/resume",
                       description="Next-token (+ MTP) fine-tuning with AdamW over the model parameters; "
                                   "checkpoints go to OUT and a rerun resumes from the latest one.")
    p.add_argument("--ckpt", required=True, help="published or converted checkpoint folder to start from")
    p.add_argument("--data", required=True, help="JSON Lines file with 'ids' or 'text' records")
    p.add_argument("--out", required=True, help="folder for training checkpoints")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--mtp-weight", type=float, default=0.3, help="weight of the MTP loss (0: off)")
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass")
    p.add_argument("--mesh", help='e.g. "fsdp=4,expert=2" (default: one device)')

    def run(args: argparse.Namespace) -> None:
        from v4jax import data, train

        model, tokenizer, on_mesh = _load(args.ckpt, args.mesh, rules="training", remat=args.remat)
        with on_mesh:  # the optimizer's moments follow their parameters, its step count lands on the mesh
            opt = train.make_optimizer(model, args.lr)
            checkpoints = train.Checkpoints(args.out)
            step = checkpoints.restore(model, opt) if checkpoints.latest_step() is not None else 0
            batches = train.packed_batches(data.documents(args.data, tokenizer), args.seq_len, args.batch, seed=step)
            while step < args.steps:
                ids, mask = next(batches)
                metrics = train.train_step(model, opt, ids, mask, mtp_weight=args.mtp_weight)
                step += 1
                print(f"step {step}: " + " ".join(f"{k} {float(v):.4f}" for k, v in metrics.items()), flush=True)
                if step % args.save_every == 0 or step == args.steps:
                    checkpoints.save(step, model, opt)

    p.set_defaults(run=run)


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete prompts (batched), streaming tokens",
                       description="Prefill and decode with compressed KV caches. One prompt streams its "
                                   "completion; several run as one batch. Stops at the checkpoint's eos token.")
    p.add_argument("--ckpt", required=True, help="published or converted checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--ids", action="append", default=[], help='raw token ids "1,2,3" (repeat for a batch)')
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: no limit")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16-cache", action="store_true", help="keep KV in the model dtype, not the FP8 layout")
    p.add_argument("--mesh", help='e.g. "data=2,expert=4" (default: one device)')

    def run(args: argparse.Namespace) -> None:
        from v4jax.generate import print_generation, stop_tokens_of
        from v4jax.sampling import Sampling

        if not args.prompt and not args.ids:
            raise SystemExit("v4jax generate: give --prompt TEXT or --ids 1,2,3")
        from v4jax.sharding import make_mesh

        model, tokenizer, _ = _load(args.ckpt, args.mesh)  # the Generator applies the rules itself
        if args.prompt and tokenizer is None:
            raise SystemExit(f"v4jax generate: {args.ckpt} has no tokenizer.json; use --ids")
        prompts = [[int(t) for t in ids.split(",")] for ids in args.ids]
        prompts += [tokenizer.encode(text).ids for text in args.prompt]
        mesh = make_mesh(args.mesh) if args.mesh else None
        print_generation(model, prompts, tokenizer=tokenizer, max_new_tokens=args.max_new_tokens,
                         sampling=Sampling(args.temperature, args.top_k, args.top_p), seed=args.seed,
                         stop_tokens=stop_tokens_of(args.ckpt), quantized_cache=not args.bf16_cache, mesh=mesh)

    p.set_defaults(run=run)


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline on a tiny model over 8 simulated devices",
                       description="Write a random checkpoint in the published layout, convert it, load it "
                                   "sharded over 8 simulated CPU devices, generate a batch, print tokens/s and "
                                   "KV-cache bytes per token.")
    p.add_argument("--workdir", help="keep the checkpoints here (default: a temporary folder)")
    p.add_argument("--max-new-tokens", type=int, default=32)

    def run(args: argparse.Namespace) -> None:
        from v4jax.demo import run_demo
        from v4jax.sharding import simulate_cpu_devices

        simulate_cpu_devices(8)
        run_demo(args.workdir, max_new_tokens=args.max_new_tokens)

    p.set_defaults(run=run)


def add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="per-device memory of Flash / Pro on simulated meshes",
                       description="Lower prefill and decode with abstract parameters on simulated CPU meshes "
                                   "and print per-device parameter, cache and temporary memory (--fit: the "
                                   "smallest mesh per device size).")

    def run(args: argparse.Namespace) -> None:
        from v4jax.sharding import plan

        plan.run(args)

    from v4jax.sharding.plan import add_arguments

    add_arguments(p)
    p.set_defaults(run=run)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_convert, add_export, add_eval, add_train,
                                                                add_generate, add_demo, add_plan]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="v4jax", description="DeepSeek-V4 in JAX: convert, export and more.")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-process run (jax.distributed) before anything else: on TPU pods, "
                             "SLURM and Open MPI the coordinator and process ids are detected; elsewhere give "
                             "--coordinator, --num-processes and --process-id")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (with --distributed)")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    args = parser.parse_args(argv)
    if args.distributed:
        _join(args)
    args.run(args)


def _join(args: argparse.Namespace) -> None:
    """jax.distributed.initialize (CPU devices exchange collectives over gloo; other backends ignore
    it). Every process runs the command; only process 0 prints its results."""
    import os
    import sys

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)


def _mesh_sharding(args: argparse.Namespace):
    """sharding_for by the inference rules of the model the checkpoint holds."""
    from pathlib import Path

    from flax import nnx

    from v4jax.config import ModelConfig
    from v4jax.checkpoint.loading import checkpoint_shardings
    from v4jax.model import Transformer
    from v4jax.sharding import make_mesh

    cfg = ModelConfig.from_json(Path(args.src) / "config.json", dtype=args.dtype, quantized=args.keep_quantized)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return checkpoint_shardings(model, make_mesh(args.mesh))


def _load(ckpt: str, mesh_spec: str | None, rules: str = "inference", remat: bool = False):
    """(model, tokenizer or None, context): the model placed by `rules` on the mesh `mesh_spec` names,
    and a context that runs it there under those rules (a no-op context without a mesh)."""
    import contextlib

    from v4jax import data, load_pretrained
    from v4jax.sharding import make_mesh, use_rules

    mesh = make_mesh(mesh_spec) if mesh_spec else None
    model = load_pretrained(ckpt, mesh=mesh, rules=rules, remat=remat)
    try:
        tokenizer = data.load_tokenizer(ckpt)
    except FileNotFoundError:
        tokenizer = None
    return model, tokenizer, use_rules(mesh, rules) if mesh is not None else contextlib.nullcontext()


if __name__ == "__main__":
    main()
