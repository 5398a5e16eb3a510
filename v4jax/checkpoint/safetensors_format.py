"""The safetensors file format (spec §3.1): a validating header reader and a byte-exact writer.

A file is an 8-byte little-endian header length N, N bytes of JSON
`{"__metadata__": {...}, name: {"dtype", "shape", "data_offsets": [begin, end)}}`,
then the data area (offsets are relative to it). The writer reproduces the
`safetensors` library's serialisation byte for byte (tensor order, compact JSON,
header padded with spaces to a multiple of 8), so files it writes are
indistinguishable from the published ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from v4jax.config import unique_keys
from v4jax.errors import CheckpointError
from v4jax.checkpoint.inventory import ITEMSIZE, TensorSpec

NUMPY_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I8": np.dtype(np.int8),
    "I64": np.dtype(np.int64),
}
# The safetensors library lays tensors out by dtype (its enum order, widest first), then by name.
_WRITE_RANK = {"I64": 0, "F32": 1, "BF16": 2, "F8_E8M0": 3, "F8_E4M3": 4, "I8": 5}
_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit


@dataclasses.dataclass(frozen=True)
class Entry:
    spec: TensorSpec
    offset: int  # absolute file offset of the first byte


@dataclasses.dataclass(frozen=True)
class Header:
    metadata: dict[str, str] | None
    entries: tuple[Entry, ...]  # in data order


def read_header(path: Path) -> Header:
    """Parse and check one file's header as strictly as the safetensors library: every entry
    well formed and sized by its dtype and shape, the tensors tiling the data area exactly
    (no gap, no overlap, no trailing bytes). The header must also be the one the library
    writes for these tensors (compact JSON, data order, space padding to 8 bytes), so that
    export can reproduce the file byte for byte."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: truncated or corrupt header (file is {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e}") from e
    try:
        header = json.loads(raw, object_pairs_hook=unique_keys)
    except ValueError as e:  # invalid UTF-8 or JSON, a duplicate key
        raise CheckpointError(f"{path}: header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, size - 8 - n
    entries = [_entry(path, name, info, data_start, data_len) for name, info in header.items()]
    entries.sort(key=lambda e: e.offset)
    end = data_start
    for prev, cur in zip([None] + entries, entries):
        if cur.offset < end:
            raise CheckpointError(f"{path}: tensor {cur.spec.name} overlaps tensor {prev.spec.name}")
        if cur.offset > end:
            raise CheckpointError(f"{path}: {cur.offset - end} unused bytes before tensor {cur.spec.name}")
        end = cur.offset + cur.spec.nbytes
    if end != size:
        raise CheckpointError(f"{path}: {size - end} trailing bytes after the last tensor")
    specs = [e.spec for e in entries]
    if header_bytes(specs, metadata) != head + raw:
        raise CheckpointError(f"{path}: header is not laid out as the safetensors library writes it "
                              "(compact JSON in data order, space-padded to 8 bytes), so it could not be "
                              "written back byte for byte")
    return Header(metadata, tuple(entries))


def _entry(path: Path, name: str, info, data_start: int, data_len: int) -> Entry:
    if not (isinstance(info, dict) and set(info) == {"dtype", "shape", "data_offsets"}):
        raise CheckpointError(f"{path}: tensor {name} has a malformed header entry {info!r}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not (isinstance(dtype, str) and dtype in ITEMSIZE):
        raise CheckpointError(f"{path}: tensor {name} has dtype {dtype!r}, not one a DeepSeek-V4 checkpoint uses")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{path}: tensor {name} has invalid data_offsets {offsets!r}")
    spec = TensorSpec(name, dtype, tuple(shape))
    begin, end = offsets
    if end - begin != spec.nbytes:
        raise CheckpointError(f"{path}: tensor {name} spans {end - begin} bytes; {dtype}{list(shape)} "
                              f"needs {spec.nbytes}")
    if end > data_len:
        raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {end} of a "
                              f"{max(data_len, 0)}-byte data area")
    return Entry(spec, data_start + begin)


def data_order(specs: list[TensorSpec]) -> list[TensorSpec]:
    """The order in which the safetensors library lays these tensors out in a file."""
    return sorted(specs, key=lambda s: (_WRITE_RANK[s.dtype], s.name.encode()))


def header_bytes(specs: list[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    """Length prefix + JSON header for tensors laid out contiguously in the given order."""
    header, offset = ({"__metadata__": metadata} if metadata is not None else {}), 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one file whose header is fixed up front; tensors then go in any order.

    Writing by offset lets callers stream tensors in whatever order they produce
    them (e.g. leaf by leaf) while the file keeps the published data order.
    """

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        head = header_bytes(specs, metadata)
        self.path = path
        self._todo: dict[str, Entry] = {}
        offset = len(head)
        for s in specs:
            self._todo[s.name] = Entry(s, offset)
            offset += s.nbytes
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with self._named_errors():
            os.pwrite(self._fd, head, 0)
            os.ftruncate(self._fd, offset)

    def write(self, name: str, array: np.ndarray) -> None:
        entry = self._todo.pop(name)
        spec = entry.spec
        if array.dtype != NUMPY_DTYPES[spec.dtype] or tuple(array.shape) != spec.shape:
            raise CheckpointError(f"{self.path}: tensor {name} is {array.dtype}{list(array.shape)}, "
                                  f"expected {spec.dtype}{list(spec.shape)}")
        view = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        done = 0
        with self._named_errors():
            while done < len(view):  # pwrite may write less than asked for large buffers
                done += os.pwrite(self._fd, view[done:], entry.offset + done)

    @contextlib.contextmanager
    def _named_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:  # a full disk: one line naming the file, not a traceback
            raise CheckpointError(f"{self.path}: cannot write: {e.strerror}") from e

    def close(self) -> None:
        os.close(self._fd)
        if self._todo:
            raise CheckpointError(f"{self.path}: tensor {next(iter(self._todo))} was never written")

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            os.close(self._fd)
