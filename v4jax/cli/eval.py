"""`v4jax eval`: one result line per row of a JSON Lines data set (`ids`/`text` records: the whole
document's log-likelihood over rolling windows; `context` + `continuation` records: the
continuation's), written to --out as each batch finishes, then a one-line JSON summary.

A rerun with the same --out scores only what is missing there, so a killed run loses at most
the batch in flight: whole rows go to --out, the scored windows of rows not yet whole (a long
document's rolling windows) to --out's `.partial` file, both appended and fsynced per batch; the
partial file goes once every row is whole. Without --out the result lines go to stdout (in row order, at
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
from collections.abc import Iterator
from pathlib import Path

import numpy as np

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
    done, earlier = {}, {}
    if args.out is not None and writer:
        done = read_results(args.out, scored_tokens)
        earlier = read_partial(partial_path(args.out), windows, done)
    skip = _agree(np.array([w.row in done or (w.row, w.part) in earlier for w in windows], bool))
    todo = [w for w, skipped in zip(windows, skip) if not skipped]
    scored: dict[int, list] = {}
    for (row, part), (logp, greedy) in earlier.items():
        scored.setdefault(row, []).append((part, logp, greedy))
    batches = evaluate.plan_batches(todo, args.batch, data_parallel_size(mesh), args.batch_tokens)

    results = dict(done)
    t0 = time.perf_counter()
    if todo or scored:
        model, on_mesh = load_model(args.ckpt, mesh, dtype=args.dtype, quant_sim=args.quant_sim,
                                    moe_impl=args.moe_impl)
        out = open(args.out, "a", encoding="utf-8") if args.out is not None and writer else None  # noqa: SIM115
        part = open(partial_path(args.out), "a", encoding="utf-8") if out is not None else None  # noqa: SIM115
        bar = tqdm(total=sum(w.end - w.start for w in todo), unit="tok", desc="eval", disable=not writer,
                   file=sys.stderr)
        finished: list[str] = []

        def on_batch(batch, pieces) -> None:
            bar.update(sum(w.end - w.start for w in batch.windows))
            # a finished batch survives a kill: its whole rows in the results, the windows of rows
            # still missing some in the partial file (results first: a kill in between rescores
            # those windows, it never loses a row)
            if out is not None:
                _append(out, finished)
                _append(part, [window_line(w, logp, greedy) for w, logp, greedy in pieces if w.row not in results])
            finished.clear()

        t0 = time.perf_counter()  # after loading: tokens/s counts scoring (and its compiles)
        try:
            with on_mesh:
                for row, s in evaluate.score(model, todo, batches, on_batch=on_batch, scored=scored):
                    line = result_line(row, s, args.logprobs)
                    results[row] = json.loads(line)
                    finished.append(line)
        finally:
            bar.close()
            if out is not None:
                out.close()
                part.close()
    seconds = time.perf_counter() - t0
    if not writer:
        return
    lines = [json.dumps(results[i]) + "\n" for i in range(n_rows)]
    if args.out is not None:
        _replace(args.out, "".join(lines))  # row order, like the data
        partial_path(args.out).unlink(missing_ok=True)  # every row is whole now
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


def partial_path(out: Path) -> Path:
    """Where the scored windows of rows not yet whole go (RESULTS.jsonl.partial), until the run ends."""
    return out.with_name(out.name + ".partial")


def window_line(window, logp, greedy) -> str:
    # float32 log-probs written in full: a resumed row sums exactly what an uninterrupted run does
    return json.dumps({"row": window.row, "part": window.part, "logprobs": logp.tolist(),
                       "is_greedy": bool(greedy.all())}) + "\n"


def read_results(path: Path, scored_tokens: list[int]) -> dict[int, dict]:
    """The rows an earlier run finished: {row: its result}. A last line without its newline (a run
    killed mid-write) is cut off the file; any other line that is not a result for this data set
    is a DataError naming path:line."""
    done = {}
    for where, record in _records(path, RESULT_KEYS, "result"):
        row = record["row"]
        if not isinstance(row, int) or not 0 <= row < len(scored_tokens):
            raise DataError(f"{where}: row {row!r} is not a row of the data ({len(scored_tokens)} rows)")
        if record["tokens"] != scored_tokens[row]:
            raise DataError(f"{where}: row {row} scored {record['tokens']} tokens, the data gives "
                            f"{scored_tokens[row]}: results of other data or another --max-len")
        done[row] = record
    return done


def read_partial(path: Path, windows, done: dict[int, dict]) -> dict[tuple[int, int], tuple]:
    """The windows an earlier run scored of rows it did not finish: {(row, part): (log p [n] float32,
    greedy [1])}; lines of rows finished since are left out. Checked and cut as read_results does."""
    spans = {(w.row, w.part): w.end - w.start for w in windows}
    earlier = {}
    for where, record in _records(path, ("row", "part", "logprobs", "is_greedy"), "scored-window"):
        key = (record["row"], record["part"])
        logprobs = record["logprobs"]
        if key not in spans or not isinstance(logprobs, list) or len(logprobs) != spans[key]:
            raise DataError(f"{where}: not a window of this data (row {key[0]!r}, part {key[1]!r}): a partial "
                            "file of other data or another --max-len")
        if key[0] not in done:
            earlier[key] = (np.asarray(logprobs, np.float32), np.array([bool(record["is_greedy"])]))
    return earlier


def _records(path: Path, keys: tuple[str, ...], kind: str) -> Iterator[tuple[str, dict]]:
    """(path:line, record) of a JSON Lines file an earlier run appended to (none if it is absent),
    its torn last line (a run killed mid-write) cut off the file first."""
    if not path.exists():
        return
    raw = path.read_bytes()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        with open(path, "r+b") as f:  # drop the torn tail before appending
            f.truncate(len(complete))
    for line_no, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        where = f"{path}:{line_no}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where}: not a {kind} line (JSON); not a file of v4jax eval?") from None
        if not isinstance(record, dict) or any(k not in record for k in keys):
            raise DataError(f"{where}: a {kind} line needs {', '.join(keys)}")
        yield where, record


def _append(f, lines: list[str]) -> None:
    if lines:
        f.write("".join(lines))
        f.flush()
        os.fsync(f.fileno())


def _agree(skip: np.ndarray) -> np.ndarray:
    """Every process of a multi-process run skips the windows process 0 found scored ([windows]
    bool; the others hold no results, they score but never write)."""
    import jax

    if jax.process_count() == 1:
        return skip
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(skip))


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
