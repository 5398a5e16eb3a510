"""Per-leaf checksums of stored arrays, recorded when a checkpoint is written and verified when
it is read back, so a damaged byte in Orbax's files is an error naming the leaf, not a model
that silently computes with it.

An array is seen as rows of bytes (its last axis; a scalar is one row). Row r's value v_r is
the sum of its little-endian 8-byte words (the last one zero-padded), and the checksum is
(sum of v_r, sum of (2r + 1) v_r) mod 2^64. Sums do not depend on how they are split, so each
shard is summed on its own (with its global rows) and the shards are added up: the value is
the same whatever sharding or mesh the array has on save and on restore, and no shard is ever
gathered. Any change to one byte changes the weighted sum (the weights are odd, hence
invertible mod 2^64), a swap of two rows changes it too, and the work is one pass at memory
speed over 8-byte words, run beside the conversion's own reading and writing.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from jax.experimental import multihost_utils

from v4jax.errors import CheckpointError

_POOL = ThreadPoolExecutor(1, thread_name_prefix="v4jax-checksum")  # numpy sums release the GIL
_BYTE_WEIGHTS = np.uint64(256) ** np.arange(8, dtype=np.uint64)


def _row_values(rows: np.ndarray, first_byte: int) -> np.ndarray:
    """[n_rows] uint64: each row's words summed, for byte columns starting at `first_byte` of the row."""
    n = rows.shape[1]
    head = 0 if first_byte % 8 == 0 else min(n, -first_byte % 8)
    body = (n - head) // 8 * 8
    total = np.zeros(rows.shape[0], np.uint64)
    if body:  # the fast path: whole aligned words
        total += np.ascontiguousarray(rows[:, head:head + body]).view("<u8").sum(axis=1, dtype=np.uint64)
    for lo, hi in ((0, head), (head + body, n)):  # at most 7 odd bytes at either end
        if hi > lo:
            weights = _BYTE_WEIGHTS[(first_byte + np.arange(lo, hi)) % 8]
            total += (rows[:, lo:hi].astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    return total


def _shard_sums(data: np.ndarray, index: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    """[2] uint64 for one shard `data` = array[index] of an array of global `shape`."""
    if not shape:
        data, index, shape = data.reshape(1), (slice(None),), (1,)
    starts = [s.indices(n)[0] for s, n in zip(index, shape)]
    rows = np.ascontiguousarray(data).view(np.uint8).reshape(-1, data.shape[-1] * data.itemsize)
    values = _row_values(rows, starts[-1] * data.itemsize)
    # Global row number of each of the shard's rows.
    row = np.zeros(data.shape[:-1], np.uint64)
    for k in range(len(shape) - 1):
        stride = np.uint64(int(np.prod(shape[k + 1:-1])) % 2**64)
        at = np.arange(data.shape[k], dtype=np.uint64) + np.uint64(starts[k])
        row = row + (at * stride).reshape((-1,) + (1,) * (len(shape) - 2 - k))
    weights = row.reshape(-1) * np.uint64(2) + np.uint64(1)
    return np.array([values.sum(dtype=np.uint64), (values * weights).sum(dtype=np.uint64)], np.uint64)


def start(arrays: Mapping[str, jax.Array]) -> dict[str, list[Future]]:
    """Start the checksums of `arrays` in the background, one task per distinct shard this process
    holds (returns at once; `finish` waits for them)."""
    pending = {}
    for name, a in arrays.items():
        pending[name] = [_POOL.submit(_shard_sums, np.asarray(shard.data), shard.index, tuple(a.shape))
                         for shard in a.addressable_shards if shard.replica_id == 0]  # each block once
    return pending


def finish(pending: Mapping[str, list[Future]]) -> dict[str, str]:
    """{name: 32 hex digits}. With several processes every one of them calls this with the same
    names: the shards' sums are added up across processes."""
    names = list(pending)
    totals = np.zeros((len(names), 2), np.uint64)
    for i, name in enumerate(names):
        for task in pending[name]:
            totals[i] += task.result()
    if jax.process_count() > 1:
        totals = np.asarray(multihost_utils.process_allgather(totals)).sum(axis=0, dtype=np.uint64)
    return {name: f"{int(t[0]):016x}{int(t[1]):016x}" for name, t in zip(names, totals)}


def verify(source: str, arrays: Mapping[str, jax.Array], recorded: Mapping[str, str]) -> None:
    """Raise CheckpointError naming the first leaf whose checksum is not the recorded one."""
    for name, got in finish(start(arrays)).items():
        want = recorded.get(name)
        if want is None:
            raise CheckpointError(f"{source}: leaf {name} has no recorded checksum")
        if got != want:
            raise CheckpointError(f"{source}: leaf {name} is damaged (checksum {got}, recorded {want})")
