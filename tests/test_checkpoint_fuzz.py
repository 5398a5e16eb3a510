"""Fuzzing the published-folder boundary: random mutations of a tiny checkpoint's bytes, headers,
index and config either convert to exactly the values the mutated bytes encode (decoded here
from the safetensors library's own parse with the oracle's numpy decoders) or are refused with
a CheckpointError / ConfigError. Never another exception, never a hang, never partial output.

The decode of an accepted folder is compared through `iter_model_layout` (the conversion's
decode pass, without an Orbax write); a refused folder is also handed to `convert`, which must
refuse it too and leave nothing behind."""

import contextlib
import json
import shutil
import signal
import struct
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_checkpoint_convert import expected_leaves
from v4jax.checkpoint import convert, iter_model_layout, read_published, write_random_checkpoint
from v4jax.config import ModelConfig
from v4jax.errors import CheckpointError, ConfigError

ROOT = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"
# The safetensors dtype names as numpy dtypes, independently of v4jax's table.
DTYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E8M0": ml_dtypes.float8_e8m0fnu, "I8": np.int8, "I64": np.int64}
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=False, width=32),
                        st.text(max_size=6), st.lists(st.integers(-1, 300), max_size=3))
FILE_NAMES = st.one_of(st.sampled_from(["../x.safetensors", "/etc/passwd", "a/b.safetensors", "x\0.safetensors", "",
                                        "model-00001-of-00004.safetensors", "config.json", "..",
                                        "model-00004-of-00004.safetensors"]), st.text(max_size=12))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One layer (CSA: compressor and indexer; hash-routed) plus the MTP block: 4 files."""
    raw = json.loads((ROOT / "configs" / "tiny.json").read_text())
    raw.update(num_hidden_layers=1, compress_ratios=[4, 0], num_hash_layers=1)
    return write_random_checkpoint(ModelConfig.from_dict(raw), tmp_path_factory.mktemp("fuzz") / "tiny")


def weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


@st.composite
def mutations(draw):
    """A list of (kind, parameters) edits, applied in order by `mutate`."""
    edits = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["flip", "flip", "truncate", "append", "header", "index", "config"]))
        if kind == "flip":
            edits.append((kind, draw(st.integers(0, 3)), draw(st.floats(0, 1)), draw(st.integers(1, 255))))
        elif kind == "truncate":
            edits.append((kind, draw(st.integers(0, 3)), draw(st.floats(0, 1))))
        elif kind == "append":
            edits.append((kind, draw(st.integers(0, 3)), draw(st.binary(min_size=1, max_size=9))))
        elif kind == "header":
            edits.append((kind, draw(st.integers(0, 3)), draw(st.integers(0, 10**6)),
                          draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra", "metadata"])),
                          draw(st.one_of(JSON_VALUES, st.sampled_from(["BF16", "F32", "I64", "F8_E4M3"])))))
        elif kind == "index":
            edits.append((kind, draw(st.integers(0, 10**6)), draw(st.sampled_from(["file", "drop", "total_size"])),
                          draw(FILE_NAMES), draw(st.integers(-1, 10**7))))
        else:
            edits.append((kind, draw(st.integers(0, 10**6)), draw(JSON_VALUES)))
    return edits


def mutate(folder: Path, edits) -> None:
    for kind, *p in edits:
        files = weight_files(folder)
        if kind in ("flip", "truncate", "append", "header") and not files:
            continue
        if kind == "flip":
            path = files[p[0] % len(files)]
            data = bytearray(path.read_bytes())
            if data:
                at = int(p[1] * (len(data) - 1))
                data[at] ^= p[2]
                path.write_bytes(bytes(data))
        elif kind == "truncate":
            path = files[p[0] % len(files)]
            with open(path, "r+b") as f:
                f.truncate(int(p[1] * path.stat().st_size))
        elif kind == "append":
            with open(files[p[0] % len(files)], "ab") as f:
                f.write(p[1])
        elif kind == "header":
            _edit_header(files[p[0] % len(files)], *p[1:])
        elif kind == "index":
            _edit_index(folder, *p)
        else:
            raw = json.loads((folder / "config.json").read_text())
            raw[sorted(raw)[p[0] % len(raw)]] = p[1]
            (folder / "config.json").write_text(json.dumps(raw))


def _edit_header(path: Path, pick: int, field: str, value) -> None:
    raw = path.read_bytes()
    if len(raw) < 8:
        return
    n = struct.unpack("<Q", raw[:8])[0]
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return
    if not isinstance(header, dict):
        return
    names = sorted(k for k in header if k != "__metadata__")
    if not names:
        return
    name = names[pick % len(names)]
    if field == "drop":
        del header[name]
    elif field == "extra":
        header[name]["extra"] = value
    elif field == "metadata":
        header["__metadata__"] = {"format": value}
    else:
        header[name][field] = value
    new = json.dumps(header, separators=(",", ":")).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _edit_index(folder: Path, pick: int, field: str, file_name: str, size: int) -> None:
    index = json.loads((folder / INDEX).read_text())
    names = list(index["weight_map"])
    name = names[pick % len(names)]
    if field == "file":
        index["weight_map"][name] = file_name
    elif field == "drop":
        del index["weight_map"][name]
    else:
        index["metadata"]["total_size"] = size
    (folder / INDEX).write_text(json.dumps(index))


def library_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder's files as the safetensors library parses them."""
    out = {}
    for path in weight_files(folder):
        for name, t in safetensors.deserialize(path.read_bytes()):
            out[name] = np.frombuffer(bytes(t["data"]), DTYPES[t["dtype"]]).reshape(t["shape"])
    return out


@contextlib.contextmanager
def time_limit(seconds: int):
    def hang(*_):
        raise TimeoutError(f"no answer within {seconds} s")
    previous = signal.signal(signal.SIGALRM, hang)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check(pristine: Path, edits) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(shutil.copytree(pristine, Path(tmp) / "src"))
        mutate(folder, edits)
        with time_limit(120):
            try:
                published = read_published(folder)
                cfg = published.cfg.replace(dtype="float32")
                ours = {name: np.asarray(value) for name, value in iter_model_layout(published, cfg)}
            except (CheckpointError, ConfigError):
                out = Path(tmp) / "out"
                with pytest.raises((CheckpointError, ConfigError)):
                    convert(folder, out / "conv", dtype="float32", progress=False)
                assert not out.exists() or not list(out.iterdir())  # no output, no staging folder
                return
        expected = expected_leaves(library_tensors(folder), cfg)  # the library accepts what v4jax accepts
        assert set(ours) == set(expected)
        for name, value in ours.items():
            assert np.array_equal(value.astype(np.float64), expected[name]), name


FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
                derandomize=True, database=None)


@settings(FUZZ, max_examples=30)
@given(edits=mutations())
def test_mutated_checkpoint_converts_exactly_or_is_refused(pristine, edits):
    check(pristine, edits)


@pytest.mark.slow
@settings(FUZZ, max_examples=400, derandomize=False)
@given(edits=mutations())
def test_mutated_checkpoint_converts_exactly_or_is_refused_many(pristine, edits):
    check(pristine, edits)
