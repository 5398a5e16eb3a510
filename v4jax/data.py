"""Token data for evaluation and fine-tuning: JSON Lines records, the checkpoint's tokenizer, and
packed training batches.

A record carries either `ids` (a list of token ids) or `text` (encoded with the
checkpoint's `tokenizer.json` through `tokenizers`); training records may instead carry
`prompt` and `completion` (loss on the completion only), scoring records `context` and
`continuation` (each a non-empty ids list or string). The file is UTF-8 (a byte-order
mark is allowed), one JSON object per line; blank lines are skipped, other keys of a
record are ignored. Every refusal is a DataError naming `file:line` and the field.

Training documents are packed into rows as the training spec recommends (§8, §10.9):
each document starts at a multiple of `ALIGN` tokens (its padding is segment 0), so the
row-aligned compression of every CSA/HCA layer equals the document's own; a document
longer than a row is split into row-long pieces, each its own segment. The rows are
served in a seeded order by Grain, reshuffled each epoch, from a position that can be
saved and restored (`DatasetIterator.get_state` / `set_state`, a JSON-able dict).
"""

from __future__ import annotations

import json
from pathlib import Path

import grain
import numpy as np

from v4jax.errors import DataError
from v4jax.tokens import check_token_ids

SCORING_FIELDS = ("context", "continuation")
# lcm of the compression ratios (4 and 128): documents start at multiples of it (spec §10.9).
ALIGN = 128


def load_tokenizer(ckpt: str | Path):
    """The `tokenizers.Tokenizer` of a checkpoint folder (published or converted); None if it has no
    tokenizer.json."""
    from tokenizers import Tokenizer

    path = Path(ckpt) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for every parse error)
        raise DataError(f"{path}: not a tokenizers file: {str(e).splitlines()[0]}") from None


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line."""
    records = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not JSON: {e}") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: each line must be a JSON object, got {type(record).__name__}")
            records.append((line_no, record))
    if not records:
        raise DataError(f"{path}: no records (every line is blank)")
    return records


def is_scoring(path: str | Path) -> bool:
    """Whether the file holds (context, continuation) records (decided by its first record)."""
    return any(key in read_records(path)[0][1] for key in SCORING_FIELDS)


def token_ids(value, tokenizer, where: str, special: bool = True, vocab_size: int | None = None) -> list[int]:
    """A field's token ids: a list of ints as is, a string through the tokenizer (with its special
    tokens, i.e. DeepSeek's BOS, where `special`: a text that starts a sequence); ids checked
    against `vocab_size` where given."""
    if isinstance(value, list):
        bad = next((t for t in value if not isinstance(t, int) or isinstance(t, bool)), None)
        if bad is not None:
            raise DataError(f"{where}: token ids must be integers, got {json.dumps(bad)}")
        ids = value
    elif isinstance(value, str):
        if not value:
            raise DataError(f"{where}: empty text")
        if tokenizer is None:
            raise DataError(f"{where}: text needs the checkpoint's tokenizer.json (or give token ids)")
        ids = tokenizer.encode(value, add_special_tokens=special).ids
    else:
        raise DataError(f"{where}: expected a list of token ids or a string, got {json.dumps(value)[:40]}")
    if not ids:
        raise DataError(f"{where}: no tokens")
    if vocab_size is not None:
        check_token_ids(ids, vocab_size, where)
    return ids


def documents(path: str | Path, tokenizer=None, vocab_size: int | None = None) -> list[list[int]]:
    """Token lists of records with `ids` or `text`."""
    out = []
    for line_no, record in read_records(path):
        keys = [k for k in ("ids", "text") if k in record]
        if len(keys) != 1:
            raise DataError(f"{path}:{line_no}: a record needs one of 'ids' or 'text'"
                            + (", not both" if keys else f", found keys {sorted(record)}"))
        key = keys[0]
        out.append(token_ids(record[key], tokenizer, f"{path}:{line_no}: field {key!r}", vocab_size=vocab_size))
    return out


def training_examples(path: str | Path, tokenizer, eos_id: int | None, vocab_size: int | None = None
                      ) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of every record, `eos_id` appended (None: nothing): `ids` or `text`
    with every token a target, `prompt` + `completion` with only the completion's tokens (and the
    EOS) targets."""
    eos = [] if eos_id is None else [eos_id]
    out = []
    for line_no, record in read_records(path):
        keys = [k for k in ("ids", "text", "prompt") if k in record]
        where = f"{path}:{line_no}: field"
        if len(keys) != 1:
            raise DataError(f"{path}:{line_no}: a record needs one of 'ids', 'text' or 'prompt' + 'completion'"
                            + (f", not {' and '.join(map(repr, keys))}" if keys else f", found keys {sorted(record)}"))
        if keys[0] == "prompt":
            if "completion" not in record:
                raise DataError(f"{path}:{line_no}: a 'prompt' record needs a 'completion'")
            prompt = token_ids(record["prompt"], tokenizer, f"{where} 'prompt'", vocab_size=vocab_size)
            completion = token_ids(record["completion"], tokenizer, f"{where} 'completion'", special=False,
                                   vocab_size=vocab_size)
            out.append((prompt + completion + eos, [0] * len(prompt) + [1] * (len(completion) + len(eos))))
        else:
            ids = token_ids(record[keys[0]], tokenizer, f"{where} {keys[0]!r}", vocab_size=vocab_size)
            out.append((ids + eos, [1] * (len(ids) + len(eos))))
    return out


def pack_rows(examples: list[tuple[list[int], list[int]]], seq_len: int, align: int = ALIGN) -> dict[str, np.ndarray]:
    """Examples packed in order into rows: {"input_ids", "loss_mask", "segment_ids", "positions"},
    each [rows, seq_len] int32. segment_ids: 0 for padding, 1.. per document piece of a row;
    positions restart at 0 with each piece. Pieces start at multiples of min(align, seq_len)."""
    unit = min(align, seq_len)
    if seq_len % unit:
        raise ValueError(f"seq_len {seq_len} must be a multiple of {align} (documents start at multiples of it)")
    pieces = [(ids[i:i + seq_len], mask[i:i + seq_len]) for ids, mask in examples for i in range(0, len(ids), seq_len)]
    rows, row, used = [], [], 0
    for piece in pieces:
        size = -(-len(piece[0]) // unit) * unit
        if used + size > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(piece)
        used += size
    if row:
        rows.append(row)
    out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("input_ids", "loss_mask", "segment_ids", "positions")}
    for r, row in enumerate(rows):
        at = 0
        for segment, (ids, mask) in enumerate(row, 1):
            span = slice(at, at + len(ids))
            out["input_ids"][r, span], out["loss_mask"][r, span] = ids, mask
            out["segment_ids"][r, span], out["positions"][r, span] = segment, np.arange(len(ids))
            at += -(-len(ids) // unit) * unit
    return out


def training_batches(rows: dict[str, np.ndarray], batch_size: int, seed: int = 0) -> grain.DatasetIterator:
    """Endless [batch_size, seq_len] batches (dicts as `pack_rows`) of the rows in a seeded order,
    reshuffled each epoch; the iterator's get_state() / set_state() save and restore its position.
    Fewer rows than one batch is a DataError."""
    n_rows, seq_len = rows["input_ids"].shape
    if n_rows < batch_size:
        raise DataError(f"data packs into {n_rows} rows of {seq_len} tokens: fewer than one batch of {batch_size}")
    source = [{k: v[i] for k, v in rows.items()} for i in range(n_rows)]
    # Grain's endless repeat has length rows x sys.maxsize, which overflows len() once the batches
    # are fewer than the rows' multiple; 2^40 rows (in whole epochs) is endless in practice.
    epochs = max(1, 2**40 // n_rows)
    dataset = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs=epochs).batch(batch_size)
    # Synchronous reads: the saved position is exactly the next batch the step gets.
    return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def scoring_requests(path: str | Path, tokenizer=None, vocab_size: int | None = None,
                     max_len: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token lists of records with those two fields; a text continuation is
    encoded without special tokens, as it continues the context. `max_len` bounds the two together."""
    out = []
    for line_no, record in read_records(path):
        missing = [k for k in SCORING_FIELDS if k not in record]
        if missing:
            raise DataError(f"{path}:{line_no}: a scoring record needs 'context' and 'continuation' "
                            f"(missing {missing[0]!r})")
        where = f"{path}:{line_no}: field"
        context = token_ids(record["context"], tokenizer, f"{where} 'context'", vocab_size=vocab_size)
        continuation = token_ids(record["continuation"], tokenizer, f"{where} 'continuation'", special=False,
                                 vocab_size=vocab_size)
        if max_len is not None and len(context) + len(continuation) > max_len:
            raise DataError(f"{path}:{line_no}: context + continuation are {len(context) + len(continuation)} "
                            f"tokens; the model takes at most {max_len}")
        out.append((context, continuation))
    return out
