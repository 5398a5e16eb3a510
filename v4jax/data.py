"""Token data for evaluation and fine-tuning: JSON Lines records and the checkpoint's tokenizer.

A record carries either `ids` (a list of token ids) or `text` (encoded with the
checkpoint's `tokenizer.json` through `tokenizers`); scoring records may instead
carry `context` and `continuation` (both ids lists or both strings).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(ckpt: str | Path):
    """The `tokenizers.Tokenizer` of a checkpoint folder (published or converted)."""
    from tokenizers import Tokenizer

    path = Path(ckpt) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json in the checkpoint folder (pass token ids instead)")
    return Tokenizer.from_file(str(path))


def read_records(path: str | Path) -> list[dict]:
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON: {e}") from e
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: each line must be a JSON object")
            records.append(record)
    return records


def tokens(value, tokenizer, where: str, special: bool = True) -> list[int]:
    """A field's token ids: a list of ints as is, a string through the tokenizer (with its special
    tokens, i.e. DeepSeek's BOS, where `special`: a text that starts a sequence)."""
    if isinstance(value, list) and all(isinstance(t, int) for t in value):
        return value
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}: text needs the checkpoint's tokenizer.json")
        return tokenizer.encode(value, add_special_tokens=special).ids
    raise ValueError(f"{where}: expected a list of token ids or a string")


def documents(path: str | Path, tokenizer=None) -> list[list[int]]:
    """Token lists of records with `ids` or `text`."""
    out = []
    for i, record in enumerate(read_records(path), 1):
        key = "ids" if "ids" in record else "text"
        if key not in record:
            raise ValueError(f"{path}: record {i} has neither 'ids' nor 'text'")
        out.append(tokens(record[key], tokenizer, f"{path}: record {i} field {key!r}"))
    return out


def scoring_requests(path: str | Path, tokenizer=None) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token lists of records with those two fields; a text continuation is
    encoded without special tokens, as it continues the context."""
    out = []
    for i, record in enumerate(read_records(path), 1):
        if "context" not in record or "continuation" not in record:
            raise ValueError(f"{path}: record {i} needs 'context' and 'continuation'")
        where = f"{path}: record {i} field"
        out.append((tokens(record["context"], tokenizer, f"{where} 'context'"),
                    tokens(record["continuation"], tokenizer, f"{where} 'continuation'", special=False)))
    return out
