"""`v4jax eval`: perplexity of `ids`/`text` records, or one log-likelihood per `context` +
`continuation` record. The data file is read and checked (file:line) before the model loads."""

from __future__ import annotations

import argparse
import json

from v4jax.cli.common import (
    UsageError,
    check_batch,
    checkpoint_config,
    existing_dir,
    existing_file,
    int_at_least,
    load_model,
    mesh_of,
    position_limit,
    positive_int,
)
from v4jax.errors import DataError

MAX_LEN = 2048


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="perplexity or log-likelihoods of a JSON Lines data set",
                       description="Records with 'ids' or 'text' -> token perplexity (rolling windows); records "
                                   "with 'context' and 'continuation' -> one log-likelihood line per record.")
    p.add_argument("--ckpt", required=True, type=existing_dir, help="published or converted checkpoint folder")
    p.add_argument("--data", required=True, type=existing_file, help="JSON Lines file")
    p.add_argument("--max-len", type=int_at_least(2),
                   help=f"window length for perplexity (>= 2: one context token and one scored token; default "
                        f"{MAX_LEN}, or the checkpoint's max_position_embeddings if smaller)")
    p.add_argument("--batch", type=positive_int, default=8)
    p.add_argument("--mesh", help='e.g. "data=2,expert=4" (default: one device)')
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from v4jax import data, evaluate

    cfg = checkpoint_config(args.ckpt)
    limit = position_limit(args.ckpt)
    if args.max_len is None:
        args.max_len = min(MAX_LEN, limit or MAX_LEN)
    elif limit is not None and args.max_len > limit:
        raise UsageError(f"--max-len {args.max_len} exceeds the checkpoint's max_position_embeddings {limit}")
    tokenizer = data.load_tokenizer(args.ckpt)
    scoring = data.is_scoring(args.data)
    if scoring:
        requests = data.scoring_requests(args.data, tokenizer, vocab_size=cfg.vocab_size, max_len=limit)
    else:
        documents = data.documents(args.data, tokenizer, vocab_size=cfg.vocab_size)
    if not scoring and not any(len(d) >= 2 for d in documents):
        raise DataError(f"{args.data}: no document has two or more tokens to score")
    mesh = mesh_of(args.mesh)
    check_batch(mesh, "inference", args.batch, "--batch")

    model, on_mesh = load_model(args.ckpt, mesh)
    with on_mesh:
        if scoring:
            for score in evaluate.loglikelihood(model, requests, args.batch, max_len=limit):
                print(json.dumps({"loglikelihood": score.loglikelihood, "is_greedy": score.is_greedy}))
        else:
            print(json.dumps(evaluate.perplexity(model, documents, args.max_len, args.batch)))
