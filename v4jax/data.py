"""Token data for evaluation and fine-tuning: JSON Lines records and the checkpoint's tokenizer.

A record carries either `ids` (a list of token ids) or `text` (encoded with the
checkpoint's `tokenizer.json` through `tokenizers`); scoring records instead carry
`context` and `continuation` (each a non-empty ids list or string). The file is
UTF-8 (a byte-order mark is allowed), one JSON object per line; blank lines are
skipped, other keys of a record are ignored. Every refusal is a DataError naming
`file:line` and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from v4jax.errors import DataError
from v4jax.tokens import check_token_ids

SCORING_FIELDS = ("context", "continuation")


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
