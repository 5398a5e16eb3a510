"""Atomic output folders: everything is written to a temporary sibling, renamed into place last.

With several processes (`jax.distributed`) all of them write into the same temporary
folder (Orbax saves from every process); process 0 creates it, renames it and cleans up.

A run killed outright (SIGKILL, OOM) cannot clean up, so process 0 leaves an owner file
(host and pid) in the folder: the next run for the same destination removes every staging
folder whose owner on this host is no longer alive, and says so. A folder owned by a live
process, or by another host (whose processes this one cannot see), is left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from v4jax.config import load_json_file
from v4jax.errors import CheckpointError


OWNER = ".v4jax-staging-owner"
log = logging.getLogger(__name__)


def check_absent(dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"{dst}: already exists; refusing to overwrite")


def check_outside(dst: Path, src: Path) -> None:
    """Refuse an output folder inside the folder it is made from, which must stay untouched."""
    inner, outer = dst.resolve(), src.resolve()
    if inner == outer or outer in inner.parents:
        raise CheckpointError(f"{dst}: inside the source folder {src}; write the output elsewhere")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clear_stale(dst: Path) -> list[Path]:
    """Remove the staging folders of `dst` left by dead runs on this host; returns them."""
    removed = []
    for tmp in dst.parent.glob(f".{dst.name}.tmp-*"):
        try:
            owner = load_json_file(tmp / OWNER)
            host, pid = owner["host"], int(owner["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("%s: staging folder without a readable owner file, left alone", tmp)
            continue
        if host != socket.gethostname() or _alive(pid):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("%s: removed the staging folder of an earlier run that died (pid %d)", tmp, pid)
        removed.append(tmp)
    return removed


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
    created = [p for p in dst.parents if not p.exists()]  # folders made for dst: removed again on failure
    if is_primary():
        dst.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(dst)
        tmp.mkdir()
        (tmp / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    _sync(f"staging {tmp}")
    try:
        yield tmp
        _sync(f"written {tmp}")
        if is_primary():
            check_absent(dst)
            (tmp / OWNER).unlink()
            try:
                tmp.rename(dst)
            except OSError as e:  # a concurrent run for the same destination finished first
                raise CheckpointError(f"{dst}: already exists; refusing to overwrite ({e.strerror})") from None
        _sync(f"renamed {dst}")
    except BaseException:
        if is_primary():
            shutil.rmtree(tmp, ignore_errors=True)
            for folder in created:  # innermost first; one another run has since filled stays
                with contextlib.suppress(OSError):
                    folder.rmdir()
        raise
