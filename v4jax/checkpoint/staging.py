"""Atomic output folders: everything is written to a temporary sibling, renamed into place last."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from v4jax.checkpoint.errors import CheckpointError


def check_absent(dst: Path) -> None:
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite")


@contextlib.contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `dst`; on success it becomes `dst`, on any
    error it is removed, so a half-written output never appears at `dst`."""
    check_absent(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        check_absent(dst)
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
