"""The `v4jax` command line: one module per verb (convert, export, generate, eval, train, demo,
plan), each with `add(subparsers)` that registers its parser and sets `run`; `main.py` holds the
top-level parser and the one error path.

Verbs import the heavier library modules (Orbax, tokenizers, the checkpoint package) inside
`run`, so `--help` and argument errors answer at once and a verb loads only what it uses.
"""

from v4jax.cli.main import main

__all__ = ["main"]
