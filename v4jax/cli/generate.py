"""`v4jax generate`: complete prompts with compressed KV caches, streaming one prompt's text.

Everything cheap is checked before the model loads: the options, the folder's config and
tokenizer, every prompt's token ids and length, the mesh.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from v4jax.cli.common import (
    UsageError,
    add_model_options,
    check_batch,
    checkpoint_config,
    existing_dir,
    load_model,
    mesh_of,
    nonnegative_float,
    nonnegative_int,
    position_limit,
    positive_int,
    prng_seed,
    token_id_list,
    top_p,
)
from v4jax.errors import DataError


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="complete prompts (batched), streaming tokens",
                       description="Prefill and decode with compressed KV caches. One prompt streams its "
                                   "completion; several share --batch-size slots (continuous batching: a "
                                   "finished sequence's slot takes the next prompt). Stops at the "
                                   "checkpoint's eos token.")
    p.add_argument("--ckpt", required=True, type=existing_dir, help="published or converted checkpoint folder")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--ids", action="append", default=[], type=token_id_list,
                   help='raw token ids "1,2,3" (repeat for a batch)')
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=nonnegative_int, default=0, help="0: no limit")
    p.add_argument("--top-p", type=top_p, default=1.0)
    p.add_argument("--seed", type=prng_seed, default=0)
    p.add_argument("--bf16-cache", action="store_true", help="keep KV in the model dtype, not the FP8 layout")
    p.add_argument("--mesh", help='e.g. "data=2,expert=4" (default: one device)')
    add_model_options(p)
    p.add_argument("--batch-size", type=positive_int, help="sequences decoded at once (default: every prompt)")
    p.add_argument("--speculative", choices=["mtp"],
                   help="mtp: the MTP block drafts a token that each step verifies (same output distribution)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: tokens, text, finish_reason, drafted, accepted")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    from v4jax import data
    from v4jax.generate import stop_tokens_of
    from v4jax.sampling import Sampling
    from v4jax.tokens import bucket, check_token_ids

    if not args.prompt and not args.ids:
        raise UsageError("give --prompt TEXT or --ids 1,2,3")
    cfg = checkpoint_config(args.ckpt)
    tokenizer = data.load_tokenizer(args.ckpt)
    if args.prompt and tokenizer is None:
        raise DataError(f"{args.ckpt}: has no tokenizer.json; give --ids instead of --prompt")
    named = [(f"--ids {','.join(map(str, ids))}", ids) for ids in args.ids]
    for text in args.prompt:
        if not text:
            raise UsageError("--prompt '': empty prompt")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
            raise UsageError(f"--prompt {text[:30]!r}: not valid UTF-8") from None
        named.append((f"--prompt {text[:30]!r}", tokenizer.encode(text).ids))
    limit = position_limit(args.ckpt)
    for where, ids in named:
        if not ids:
            raise DataError(f"{where}: encodes to no tokens")
        check_token_ids(ids, cfg.vocab_size, where)
        if limit is not None and len(ids) > limit:
            raise DataError(f"{where}: {len(ids)} tokens; the checkpoint's max_position_embeddings is {limit}")
    prompts = [ids for _, ids in named]
    if args.speculative and not cfg.num_nextn_predict_layers:
        raise UsageError(f"--speculative mtp: {args.ckpt} has no MTP block (num_nextn_predict_layers is 0)")
    stop_tokens = stop_tokens_of(args.ckpt)
    mesh = mesh_of(args.mesh)
    slots = min(args.batch_size or len(prompts), len(prompts))
    check_batch(mesh, "inference", slots, f"a batch of {slots} sequences")

    # The Generator applies the rules itself.
    model, _ = load_model(args.ckpt, mesh, dtype=args.dtype, quant_sim=args.quant_sim, moe_impl=args.moe_impl)
    # room for every new token, up to the checkpoint's position limit (then a sequence stops: "length")
    max_len = max(map(len, prompts)) + args.max_new_tokens
    max_len = min(max_len, limit) if limit is not None else max_len
    print_generation(model, prompts, tokenizer=tokenizer, max_len=max_len, prefill_chunk=min(512, bucket(max_len)),
                     max_new_tokens=args.max_new_tokens, sampling=Sampling(args.temperature, args.top_k, args.top_p),
                     seed=args.seed, stop_tokens=stop_tokens, quantized_cache=not args.bf16_cache, mesh=mesh,
                     batch_size=slots, speculative=args.speculative == "mtp", as_json=args.json)


def print_generation(model, prompts: Sequence[Sequence[int]], *, tokenizer, max_len: int, prefill_chunk: int,
                     max_new_tokens: int, sampling, seed: int, stop_tokens: Sequence[int], quantized_cache: bool,
                     mesh, batch_size: int | None = None, speculative: bool = False, as_json: bool = False) -> None:
    """One prompt streams its text (or token ids) as tokens come, a batch prints every completion at
    the end (as_json: one JSON object per prompt); throughput and KV-cache size go to stderr."""
    from v4jax.cache import cache_bytes_per_token
    from v4jax.generate import Generator, TextStream

    gen = Generator(model, batch_size=batch_size or len(prompts), max_len=max_len, prefill_chunk=prefill_chunk,
                    quantized_cache=quantized_cache, mesh=mesh, speculative=speculative)

    def render(tokens: Sequence[int]) -> str:
        return tokenizer.decode(list(tokens)) if tokenizer else " ".join(map(str, tokens))

    on_token = None
    streaming = len(prompts) == 1 and not as_json
    if streaming:
        stream = TextStream(tokenizer) if tokenizer else None

        def on_token(_: int, token: int) -> None:
            sys.stdout.write(stream.push(token) if stream else f"{token} ")
            sys.stdout.flush()

    result = gen.generate(prompts, max_new_tokens, sampling, seed, stop_tokens, on_token)
    if streaming:
        print()
    elif as_json:
        for seq in result.sequences:
            row = {"tokens": seq.tokens, **({"text": tokenizer.decode(seq.tokens)} if tokenizer else {}),
                   "finish_reason": seq.finish_reason, "drafted": seq.drafted, "accepted": seq.accepted}
            print(json.dumps(row))
    else:
        for i, seq in enumerate(result.sequences):
            print(f"[{i}] {render(seq.tokens)}")
    per_token = cache_bytes_per_token(model.cfg, max_len, quantized_cache)
    layout = "FP8" if quantized_cache else model.cfg.dtype
    print(f"{result.prompt_tokens} prompt tokens, prefill {result.prefill_seconds:.2f} s (compile included); "
          f"{result.new_tokens} new tokens, decode {result.decode_tokens_per_second:.1f} tokens/s at batch "
          f"{gen.batch_size}; KV cache {per_token:.0f} bytes/token ({layout} layout)"
          + (f"; MTP drafts accepted {result.acceptance:.0%}" if speculative else ""), file=sys.stderr)
