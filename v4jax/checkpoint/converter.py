"""Published checkpoint -> Orbax checkpoint of the model layout, streamed leaf by leaf.

A converted folder holds:
- `state/`: the Orbax checkpoint, a flat dict of model-layout leaves;
- `config.json` (the published file, byte for byte) and `v4jax.json` ({"dtype", "keep_quantized"}),
  enough to rebuild the model from this folder alone (`converted_config`);
- `layout.json`: the published file split, so that export writes the same files back;
- `checksums.json`: a checksum per leaf (`v4jax.checkpoint.checksum`), verified whenever a
  leaf is restored, so a damaged byte is an error naming the leaf;
- the tokenizer and generation-config files of the source, if it had them.

Each leaf is built with `jax.make_array_from_callback` straight onto its sharding,
the callback reading only that device's window of the published files, and is
handed to Orbax partial saves in batches; nothing exists at DST until the
whole folder is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import jax
import numpy as np
from orbax.checkpoint.experimental import v1 as ocp
from tqdm import tqdm

from v4jax.checkpoint import checksum
from v4jax.checkpoint.model_layout import Leaf, leaves, model_layout
from v4jax.checkpoint.layout import INDEX
from v4jax.checkpoint.reader import PublishedCheckpoint, companion_files, read_published
from v4jax.checkpoint.staging import check_absent, check_outside, is_primary, staging
from v4jax.config import ConfigError, ModelConfig, load_json_file
from v4jax.errors import CheckpointError, V4jaxError

STATE = "state"
INFO = "v4jax.json"
LAYOUT = "layout.json"
CHECKSUMS = "checksums.json"
# Leaves go to Orbax in saves of at most this many bytes (a larger leaf alone), so small
# leaves share a save while memory stays at two saves' worth.
_SAVE_BYTES = 256 * 2**20
T = TypeVar("T")

ShardingFor = Callable[[str, tuple[int, ...]], jax.sharding.Sharding]


def iter_model_layout(published: PublishedCheckpoint, cfg: ModelConfig, keep_quantized: bool = False,
                      sharding_for: ShardingFor | None = None) -> Iterator[tuple[str, jax.Array]]:
    """(name, array) for every model-layout leaf, each read and placed on its sharding as it
    is yielded (None: the first local device). `cfg` may differ from the checkpoint's only
    in runtime options such as `dtype`."""
    if cfg.to_dict() != published.cfg.to_dict():
        raise CheckpointError(f"{published.path}: config differs from the one given for conversion")
    for leaf in leaves(cfg, keep_quantized):
        yield leaf.name, _place(leaf, published, sharding_for)


def convert(src: str | Path, dst: str | Path, keep_quantized: bool = False, dtype: str = "bfloat16",
            sharding_for: ShardingFor | None = None, progress: bool = True) -> Path:
    """Convert the published checkpoint folder `src` into an Orbax folder `dst` (see module doc)."""
    dst, src = Path(dst).absolute(), Path(src).absolute()
    check_absent(dst)
    check_outside(dst, src)
    _check_utf8(dst)
    if (src / INFO).is_file() and not (src / INDEX).is_file():
        raise CheckpointError(f"{src}: a converted v4jax checkpoint, not a published one (export writes that back)")
    published = read_published(src)
    companions = companion_files(published.path)
    cfg = published.cfg.replace(dtype=dtype)
    plan = leaves(cfg, keep_quantized)
    with staging(dst) as tmp:
        if is_primary():  # files that exist once; every process saves its own shards through Orbax
            for path in [published.path / "config.json"] + companions:
                shutil.copyfile(path, tmp / path.name)
            (tmp / INFO).write_text(json.dumps({"dtype": dtype, "keep_quantized": keep_quantized}))
            (tmp / LAYOUT).write_text(published.layout.to_json())
        bar = tqdm(total=sum(leaf.source_bytes for leaf in plan), unit="B", unit_scale=True,
                   desc=f"convert {published.path.name}", disable=not (progress and is_primary()))
        with bar, orbax_context(), _Interrupts() as interrupts:
            sums = _save_in_batches(tmp / STATE, plan, lambda leaf: _place(leaf, published, sharding_for), bar,
                                    interrupts)
            with _writing(tmp / STATE):
                ocp.partial.finalize(tmp / STATE)
            interrupts.check()
        if is_primary():
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=0))
    return dst


def _save_in_batches(path: Path, plan: list[Leaf], place: Callable[[Leaf], jax.Array], bar: tqdm,
                     interrupts: "_Interrupts") -> dict[str, str]:
    """Orbax partial saves of at most _SAVE_BYTES each (or one larger leaf). A batch is
    written in the background while the next one is read, so reading overlaps writing
    and at most two batches are alive. Returns the leaves' checksums (computed
    asynchronously beside the saves)."""
    in_flight: list = []  # at most one (response, source bytes)
    pending = {}
    try:
        for group in byte_batches(plan, lambda leaf: leaf.nbytes, _SAVE_BYTES):
            interrupts.check()
            batch = {leaf.name: place(leaf) for leaf in group}
            pending.update(checksum.start(batch))
            _wait(path, in_flight, bar)
            with _writing(path):
                in_flight.append((ocp.partial.save_async(path, batch), sum(leaf.source_bytes for leaf in group)))
        _wait(path, in_flight, bar)
        return checksum.finish(pending)
    finally:
        with contextlib.suppress(Exception):  # an error already on its way matters more
            _wait(path, in_flight, bar)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Orbax's write errors as one CheckpointError naming the folder: tensorstore reports a full
    disk or a denied write as a ValueError."""
    try:
        yield
    except V4jaxError:
        raise
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot write: {type(e).__name__}: {_first_line(e)}") from e


def byte_batches(items: Iterable[T], nbytes: Callable[[T], int], limit: int) -> Iterator[list[T]]:
    """Consecutive items in lists of at most `limit` bytes (or one larger item alone); the next
    list is only gathered once the previous one has been handed on."""
    batch, pending = [], 0
    for item in items:
        size = nbytes(item)
        if batch and pending + size > limit:
            yield batch
            batch, pending = [], 0
        batch.append(item)
        pending += size
    if batch:
        yield batch


class _Interrupts:
    """Ctrl-C stops a conversion between two saves, never inside one: Orbax's background writes,
    cut off mid-way, go on writing into the staging folder after the error path has removed it.
    (Off the main thread, where no signal handler can be set, interrupts are not deferred.)"""

    def __enter__(self) -> "_Interrupts":
        self.pending, self.installed = False, threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._note)
        return self

    def _note(self, *_) -> None:
        self.pending = True

    def check(self) -> None:
        if self.pending:
            raise KeyboardInterrupt

    def __exit__(self, *_) -> None:
        if self.installed:  # None: a handler set outside Python, which Python cannot reinstate
            signal.signal(signal.SIGINT, signal.SIG_DFL if self.previous is None else self.previous)


def _wait(path: Path, in_flight: list, bar: tqdm) -> None:
    while in_flight:
        response, read = in_flight[0]
        with _writing(path):
            response.result()  # an interrupted wait (Ctrl-C) leaves the save listed: the error path waits again
        in_flight.pop(0)
        bar.update(read)


def converted_config(path: str | Path) -> ModelConfig:
    """The config of a converted folder, with `dtype` and `quantized` (= kept quantised) as converted."""
    path = Path(path).absolute()
    if (path / INDEX).is_file() and not (path / INFO).is_file():
        raise CheckpointError(f"{path}: a published checkpoint folder, not a converted one (convert makes one)")
    if not (path / INFO).is_file():
        raise CheckpointError(f"{path}: not a checkpoint folder (neither a published {INDEX} nor a converted {INFO})")
    info = read_json(path / INFO)
    if not (isinstance(info, dict) and info.get("dtype") in ("bfloat16", "float32")
            and isinstance(info.get("keep_quantized"), bool)):
        raise CheckpointError(f"{path / INFO}: expected {{\"dtype\": \"bfloat16\" | \"float32\", "
                              f"\"keep_quantized\": true | false}}")
    try:
        return ModelConfig.from_json(path / "config.json", dtype=info["dtype"], quantized=info["keep_quantized"])
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_json(path: Path):
    """A JSON file of a checkpoint folder; unreadable or invalid -> CheckpointError naming it."""
    try:
        return load_json_file(path)
    except (OSError, ValueError) as e:  # ValueError: invalid UTF-8 or JSON, a duplicate key
        raise CheckpointError(f"{path}: cannot read: {type(e).__name__}: {e}") from None


def load_flat(path: str | Path, abstract: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Restore the named leaves of a converted folder straight onto their shardings.

    `abstract` may name any subset of the stored leaves (e.g. only what a model holds);
    a leaf without a sharding goes to the first local device. bfloat16 and float32
    leaves may be restored as either; every other dtype and every shape must match.
    """
    path = Path(path).absolute()
    _check_utf8(path)
    cfg = converted_config(path)
    stored = model_layout(cfg, cfg.quantized)
    recorded = read_json(path / CHECKSUMS)
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{path / CHECKSUMS}: expected an object {{leaf: checksum}}")
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    floats = {np.dtype(jax.numpy.bfloat16), np.dtype(np.float32)}
    target = {}
    for name, want in abstract.items():
        have = stored.get(name)
        if have is None:
            raise CheckpointError(f"{path}: no leaf {name} in this checkpoint")
        if tuple(want.shape) != have.shape or not (want.dtype == have.dtype or {want.dtype, have.dtype} <= floats):
            raise CheckpointError(f"{path}: leaf {name} is {have.dtype}{list(have.shape)}, "
                                  f"asked for {want.dtype}{list(want.shape)}")
        # Restored as stored (what the checksum covers), then cast on device.
        target[name] = jax.ShapeDtypeStruct(have.shape, have.dtype, sharding=getattr(want, "sharding", None) or default)
    _check_orbax_json(path / STATE)
    try:
        with orbax_context():
            restored = ocp.load(path / STATE, target)
    except Exception as e:  # Orbax and tensorstore raise many types for a damaged folder
        raise CheckpointError(f"{path / STATE}: cannot restore: "
                              f"{_disagreement(path, target) or f'{type(e).__name__}: {_first_line(e)}'}") from e
    checksum.verify(str(path / STATE), restored, recorded)
    return {name: a if a.dtype == abstract[name].dtype else a.astype(abstract[name].dtype)
            for name, a in restored.items()}


def _disagreement(path: Path, target: dict[str, jax.ShapeDtypeStruct]) -> str | None:
    """After a failed restore: the first leaf whose stored shape or dtype is not what the folder's
    config.json and v4jax.json describe (say, an edited config.json), if that is the cause."""
    try:
        stored = ocp.metadata(path / STATE).metadata
    except Exception:  # the metadata is as damaged as the rest
        return None
    for name, want in target.items():
        have = stored.get(name) if isinstance(stored, dict) else None
        if have is None:
            return f"no leaf {name} (config.json and {INFO} describe one)"
        if tuple(have.shape) != tuple(want.shape) or np.dtype(have.dtype) != np.dtype(want.dtype):
            return (f"leaf {name} is stored as {np.dtype(have.dtype)}{list(have.shape)}; config.json and {INFO} "
                    f"describe {np.dtype(want.dtype)}{list(want.shape)}")
    return None


# The JSON files Orbax keeps beside the array data; parsed first, so a damaged one is named.
_ORBAX_JSON = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding")


def _check_orbax_json(state: Path) -> None:
    if not state.is_dir():
        raise CheckpointError(f"{state}: missing (not a converted v4jax checkpoint)")
    for f in sorted(state.rglob("*")):
        if f.name in _ORBAX_JSON or f.parent.name == "array_metadatas":
            read_json(f)


def _check_utf8(path: Path) -> None:
    """Orbax hands paths to tensorstore, which takes only UTF-8: a file name of other bytes
    (surrogate-escaped by Python) would fail inside it with a cast error."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise CheckpointError(f"{path}: not a UTF-8 path, which Orbax cannot write or read; "
                              "rename it") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def iter_flat(path: str | Path, abstract: dict[str, jax.ShapeDtypeStruct],
              batch_bytes: int = _SAVE_BYTES) -> Iterator[tuple[str, jax.Array]]:
    """`load_flat` a batch of at most `batch_bytes` (or one larger leaf) at a time: (name, leaf)
    pairs for a consumer that lets each go before the next batch is restored."""
    def nbytes(item: tuple[str, jax.ShapeDtypeStruct]) -> int:
        return math.prod(item[1].shape) * np.dtype(item[1].dtype).itemsize

    for group in byte_batches(abstract.items(), nbytes, batch_bytes):
        yield from load_flat(path, dict(group)).items()


def orbax_context() -> ocp.Context:
    ctx = ocp.Context()
    ctx.array.saving.use_compression = False  # weights barely compress; conversion speed matters more
    ctx.memory.deepcopy_host_arrays = False  # leaves are written once and never mutated
    ctx.pytree.loading.partial_load = True  # callers restore subsets of the leaves
    return ctx


def _place(leaf: Leaf, published: PublishedCheckpoint, sharding_for: ShardingFor | None) -> jax.Array:
    sharding = (sharding_for(leaf.name, leaf.shape) if sharding_for
                else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    windows: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        # Devices that replicate a window share one read of it.
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in windows:
            windows[key] = leaf.read(published, index)
        return windows[key]

    return jax.make_array_from_callback(leaf.shape, sharding, read, dtype=leaf.dtype)
