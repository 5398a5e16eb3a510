"""Atomic output folders: everything is written to a temporary sibling, renamed into place last.

With several processes (`jax.distributed`) all of them write into the same temporary
folder (Orbax saves from every process); process 0 creates it, renames it and cleans up.
"""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from v4jax.errors import CheckpointError


def check_absent(dst: Path) -> None:
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite")


def is_primary() -> bool:
    """Whether this process writes the files that exist once (process 0)."""
    return jax.process_index() == 0


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(tag)


def _token() -> str:
    """A random folder suffix, the same on every process."""
    token = np.frombuffer(uuid.uuid4().bytes[:4], np.uint8)
    if jax.process_count() > 1:
        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return bytes(token.astype(np.uint8)).hex()


@contextlib.contextmanager
def staging(dst: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `dst`; on success it becomes `dst`, on any
    error it is removed, so a half-written output never appears at `dst`."""
    check_absent(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{_token()}"
    if is_primary():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    _sync(f"staging {tmp}")
    try:
        yield tmp
        _sync(f"written {tmp}")
        if is_primary():
            check_absent(dst)
            tmp.rename(dst)
        _sync(f"renamed {dst}")
    except BaseException:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
