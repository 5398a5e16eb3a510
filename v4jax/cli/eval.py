"""`v4jax eval`: one result line per row of a JSON Lines data set (`ids`/`text` records: the whole
document's log-likelihood over rolling windows; `context` + `continuation` records: the
continuation's), written to --out as each batch finishes, then a one-line JSON summary.

A rerun with the same --out scores only the rows missing there, so a killed run loses at most
the rows of the batches in flight. Without --out the result lines go to stdout (in row order, at
the end) and the summary to stderr, as `v4jax eval ... > results.jsonl` would expect; with --out
the summary is stdout's only line. The data file is read and checked (file:line) before the
model loads; so is a results file left by an earlier run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from v4jax.cli.common import (
    UsageError,
    add_model_options,
    check_batch,
    checkpoint_config,
    data_parallel_size,
    existing_dir,
    existing_file,
    int_at_least,
    load_model,
    mesh_of,
    new_file,
    position_limit,
    positive_int,
)
from v4jax.errors import DataError

MAX_LEN = 2048
RESULT_KEYS = ("row", "loglikelihood", "tokens", "is_greedy")


def add(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="log-likelihoods of a JSON Lines data set, saved as they come, resumable",
                       description="Records with 'ids' or 'text' -> each document's log-likelihood (rolling windows "
                                   "of --max-len, the first token context only); records with 'context' and "
                                   "'continuation' -> the continuation's. One result line per record, then a JSON "
                                   "summary (rows, tokens, mean log-likelihood per token, perplexity, tokens/s, "
                                   "padded fraction).")
    p.add_argument("--ckpt", required=True, type=existing_dir, help="published or converted checkpoint folder")
    p.add_argument("--data", required=True, type=existing_file, help="JSON Lines file")
    p.add_argument("--out", type=new_file,
                   help="results file (JSON Lines, one line per record, fsynced per batch); if it exists, only the "
                        "records missing from it are scored")
    p.add_argument("--logprobs", action="store_true", help="add each scored token's log-probability to its row")
    p.add_argument("--max-len", type=int_at_least(2),
                   help=f"window length (>= 2: one context token and one scored token; default {MAX_LEN}, or the "
                        "checkpoint's max_position_embeddings if smaller); a longer context loses its oldest tokens")
    p.add_argument("--batch", type=positive_int,
                   help="rows per batch, a multiple of the mesh's data-parallel size (default: as many as fit "
                        "--batch-tokens for each length bucket)")
    p.add_argument("--batch-tokens", type=positive_int, default=8192,
                   help="padded tokens per batch when --batch is not given")
    p.add_argument("--mesh", help='e.g. "data=2,expert=4" (default: one device)')
    add_model_options(p)
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> None:
    import jax
    from tqdm import tqdm

    from v4jax import data, evaluate

    cfg = checkpoint_config(args.ckpt)
    limit = position_limit(args.ckpt)
    if args.max_len is None:
        args.max_len = min(MAX_LEN, limit or MAX_LEN)
    elif limit is not None and args.max_len > limit:
        raise UsageError(f"--max-len {args.max_len} exceeds the checkpoint's max_position_embeddings {limit}")
    tokenizer = data.load_tokenizer(args.ckpt)
    if data.is_scoring(args.data):
        requests = data.scoring_requests(args.data, tokenizer, vocab_size=cfg.vocab_size, max_len=limit)
        windows = [evaluate.continuation_window(i, c, k, args.max_len) for i, (c, k) in enumerate(requests)]
        n_rows = len(requests)
    else:
        documents = data.documents(args.data, tokenizer, vocab_size=cfg.vocab_size)
        if not any(len(d) >= 2 for d in documents):
            raise DataError(f"{args.data}: no document has two or more tokens to score")
        windows = [w for i, d in enumerate(documents) for w in evaluate.document_windows(i, d, args.max_len)]
        n_rows = len(documents)
    scored_tokens = [0] * n_rows
    for w in windows:
        scored_tokens[w.row] += w.end - w.start
    mesh = mesh_of(args.mesh)
    if args.batch is not None:
        check_batch(mesh, "inference", args.batch, "--batch")
    writer = jax.process_index() == 0
    done = read_results(args.out, scored_tokens) if args.out is not None and writer else {}
    done = _agree(done, n_rows)
    todo = [w for w in windows if w.row not in done]
    batches = evaluate.plan_batches(todo, args.batch, data_parallel_size(mesh), args.batch_tokens)

    results = dict(done)
    t0 = time.perf_counter()
    if todo:
        model, on_mesh = load_model(args.ckpt, mesh, dtype=args.dtype, quant_sim=args.quant_sim)
        out = open(args.out, "a", encoding="utf-8") if args.out is not None and writer else None  # noqa: SIM115
        bar = tqdm(total=sum(w.end - w.start for w in todo), unit="tok", desc="eval", disable=not writer,
                   file=sys.stderr)
        finished: list[str] = []

        def on_batch(batch) -> None:
            bar.update(sum(w.end - w.start for w in batch.windows))
            if out is not None and finished:
                out.write("".join(finished))
                out.flush()
                os.fsync(out.fileno())  # a finished batch survives a kill
            finished.clear()

        t0 = time.perf_counter()  # after loading: tokens/s counts scoring (and its compiles)
        try:
            with on_mesh:
                for row, s in evaluate.score(model, todo, batches, on_batch=on_batch):
                    line = result_line(row, s, args.logprobs)
                    results[row] = json.loads(line)
                    finished.append(line)
        finally:
            bar.close()
            if out is not None:
                out.close()
    seconds = time.perf_counter() - t0
    if not writer:
        return
    lines = [json.dumps(results[i]) + "\n" for i in range(n_rows)]
    if args.out is not None:
        _replace(args.out, "".join(lines))  # row order, like the data
    else:
        sys.stdout.write("".join(lines))
    tokens = sum(r["tokens"] for r in results.values())
    ll = sum(r["loglikelihood"] for r in results.values())
    new_tokens = sum(w.end - w.start for w in todo)
    summary = {"rows": n_rows, "rows_scored": n_rows - len(done), "tokens": tokens,
               "mean_loglikelihood": ll / tokens if tokens else 0.0,
               "perplexity": math.exp(-ll / tokens) if tokens else 1.0,
               "tokens_per_second": new_tokens / seconds if new_tokens and seconds > 0 else 0.0,
               "padded_fraction": evaluate.padded_fraction(batches)}
    print(json.dumps(summary), file=sys.stdout if args.out is not None else sys.stderr, flush=True)


def result_line(row: int, score, logprobs: bool) -> str:
    record = {"row": row, "loglikelihood": score.loglikelihood, "tokens": score.n_tokens,
              "is_greedy": score.is_greedy}
    if logprobs:
        record["logprobs"] = list(score.logprobs)
    return json.dumps(record) + "\n"


def read_results(path: Path, scored_tokens: list[int]) -> dict[int, dict]:
    """The rows an earlier run finished: {row: its result}. A last line without its newline (a run
    killed mid-write) is cut off the file; any other line that is not a result for this data set
    is a DataError naming path:line."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as f:  # drop the torn tail before appending
            f.truncate(len(complete))
    done = {}
    for line_no, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where}: not a result line (JSON); not a results file of v4jax eval?") from None
        if not isinstance(record, dict) or any(k not in record for k in RESULT_KEYS):
            raise DataError(f"{where}: a result line needs {', '.join(RESULT_KEYS)}")
        row = record["row"]
        if not isinstance(row, int) or not 0 <= row < len(scored_tokens):
            raise DataError(f"{where}: row {row!r} is not a row of the data ({len(scored_tokens)} rows)")
        if record["tokens"] != scored_tokens[row]:
            raise DataError(f"{where}: row {row} scored {record['tokens']} tokens, the data gives "
                            f"{scored_tokens[row]}: results of other data or another --max-len")
        done[row] = record
    return done


def _agree(done: dict[int, dict], n_rows: int) -> dict[int, dict]:
    """Every process of a multi-process run skips the rows process 0 found done (the others hold
    no results, only the mask: they score but never write)."""
    import jax

    if jax.process_count() == 1:
        return done
    import numpy as np
    from jax.experimental import multihost_utils

    mask = np.zeros(n_rows, bool)
    mask[list(done)] = True
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return done if jax.process_index() == 0 else {int(i): {} for i in np.flatnonzero(mask)}


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
