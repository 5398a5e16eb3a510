"""Every file a user hands v4jax is checked: each defect class is refused with one CheckpointError
naming the file and tensor / key / leaf, and nothing is written or lost (the source untouched, no
output or staging folder left, an existing destination never replaced). Real-world folders
(relative paths, Hugging Face cache snapshots of symlinks) convert and export back byte for byte."""

import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from v4jax.checkpoint import CheckpointError, convert, export, load_flat, model_layout, write_random_checkpoint
from v4jax.checkpoint.reader import read_published
from v4jax.checkpoint.staging import OWNER

from test_checkpoint_fuzz import time_limit

layout_module = importlib.import_module("v4jax.checkpoint.model_layout")  # the package exports a function of that name

ROOT = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_random_checkpoint(ROOT / "configs" / "tiny.json", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def converted(pristine, tmp_path_factory):
    return convert(pristine, tmp_path_factory.mktemp("conv") / "tiny", keep_quantized=True, progress=False)


@pytest.fixture
def src(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def same_files(a: Path, b: Path) -> bool:
    return digest(a) == digest(b)


def refused(run, message: str, source: Path, out_parent: Path) -> None:
    """`run()` raises CheckpointError matching `message`; the source is unchanged and nothing
    (no output, no staging folder) appears in `out_parent`."""
    before = digest(source)
    existing = sorted(p.name for p in out_parent.iterdir()) if out_parent.exists() else []
    with pytest.raises(CheckpointError, match=message):
        run()
    assert digest(source) == before
    assert (sorted(p.name for p in out_parent.iterdir()) if out_parent.exists() else []) == existing


def poke(folder: Path, name: str, at: int, data: bytes) -> None:
    loc = read_published(folder).tensors[name]
    with open(loc.file, "r+b") as f:
        f.seek(loc.offset + at)
        f.write(data)


def file_of(folder: Path, name: str) -> Path:
    return folder / json.loads((folder / INDEX).read_text())["weight_map"][name]


def rewrite_header(path: Path, edit, pad: bytes = b" ") -> None:
    """Replace the header with `edit(header)` serialised compactly, padded with `pad` to 8 bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = edit(json.loads(raw[8:8 + n]))
    new = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    new += pad * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


# ---------------------------------------------------------------------------- confinement
@pytest.mark.parametrize("bad", ["/tmp/v4jax-escape.safetensors", "../escape.safetensors", "sub/x.safetensors",
                                 "x\\y.safetensors", "nul\0.safetensors", "", "config.json", ".safetensors"])
def test_export_refuses_a_recorded_file_name_that_is_not_a_plain_name(converted, tmp_path, bad):
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    layout = json.loads((folder / "layout.json").read_text())
    layout["shards"][1]["file"] = bad
    (folder / "layout.json").write_text(json.dumps(layout))
    refused(lambda: export(folder, tmp_path / "out" / "back", progress=False),
            r"layout\.json: shards\[1\]\.file names .*; expected a plain file name", folder, tmp_path / "out")
    assert not Path("/tmp/v4jax-escape.safetensors").exists() and not (tmp_path / "escape.safetensors").exists()


def test_export_refuses_a_file_listed_twice(converted, tmp_path):
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    layout = json.loads((folder / "layout.json").read_text())
    layout["shards"][2]["file"] = layout["shards"][1]["file"]
    (folder / "layout.json").write_text(json.dumps(layout))
    refused(lambda: export(folder, tmp_path / "out", progress=False),
            r"layout\.json: file 'model-00002-of-00009\.safetensors' is listed twice", folder, tmp_path)


@pytest.mark.parametrize("bad", ["nul\0.safetensors", "", "a/b.safetensors", "model-00001-of-00009.bin"])
def test_convert_refuses_an_index_entry_that_is_not_a_plain_name(src, tmp_path, bad):
    index = json.loads((src / INDEX).read_text())
    index["weight_map"]["norm.weight"] = bad
    (src / INDEX).write_text(json.dumps(index))
    refused(lambda: convert(src, tmp_path / "out" / "conv", progress=False),
            rf"{INDEX}: weight_map\['norm\.weight'\] names .*; expected a plain file name", src, tmp_path / "out")


# ---------------------------------------------------------------------------- real-world folders
def test_convert_and_export_with_relative_paths(pristine, tmp_path, monkeypatch):
    shutil.copytree(pristine, tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    convert("ckpt", "conv", progress=False)
    export("conv", "back", progress=False)
    assert same_files(pristine, tmp_path / "back")
    assert load_flat("conv", {"norm.weight": model_layout(read_published("ckpt").cfg, False)["norm.weight"]})


def test_hugging_face_cache_snapshot_of_symlinks_converts_and_exports_back(pristine, tmp_path):
    """`huggingface-cli download` layout: snapshots/<rev>/<name> -> ../../blobs/<sha256>."""
    repo = tmp_path / "models--deepseek-ai--DeepSeek-V4-Tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in pristine.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snapshot / f.name).symlink_to(f"../../blobs/{blob}")
    convert(snapshot, tmp_path / "conv", progress=False)
    export(tmp_path / "conv", tmp_path / "back", progress=False)
    assert same_files(pristine, tmp_path / "back")
    assert not any(p.is_symlink() for p in (tmp_path / "back").iterdir())


# ---------------------------------------------------------------------------- values
@pytest.mark.parametrize("name, at, data, index, keep", [
    ("embed.weight", 2 * (3 * 128 + 5), np.array(np.nan, ml_dtypes.bfloat16).tobytes(), "[3, 5]", False),
    ("layers.1.hc_attn_fn", 4 * (2 * 512 + 7), np.float32(-np.inf).tobytes(), "[2, 7]", False),
    ("layers.0.attn.wq_a.weight", 128 * 9 + 4, b"\x7f", "[9, 4]", False),  # E4M3 NaN, dequantised
    ("layers.0.attn.wq_a.weight", 128 * 9 + 4, b"\xff", "[9, 4]", True),  # -NaN, kept quantised
    ("mtp.0.attn.wo_a.weight", 256 * 10 + 1, b"\x7f", "[10, 1]", False),  # grouped on conversion
])
def test_non_finite_weight_is_refused_with_file_tensor_and_index(src, tmp_path, name, at, data, index, keep):
    poke(src, name, at, data)
    refused(lambda: convert(src, tmp_path / "out" / "conv", keep_quantized=keep, progress=False),
            rf"{file_of(src, name).name}: tensor {re.escape(name)} holds a non-finite value .* at {re.escape(index)}",
            src, tmp_path / "out")


def test_export_of_a_model_with_a_nan_weight_is_refused(converted, tmp_path):
    from v4jax.checkpoint import converted_config

    cfg = converted_config(converted)
    flat = {n: np.asarray(v) for n, v in load_flat(converted, model_layout(cfg, cfg.quantized)).items()}
    flat["layers.3.attn_norm.weight"] = flat["layers.3.attn_norm.weight"].copy()
    flat["layers.3.attn_norm.weight"][17] = np.nan
    refused(lambda: export(flat, tmp_path / "out" / "back", cfg=cfg, progress=False),
            r"flat dict: tensor layers\.3\.attn_norm\.weight holds a non-finite value \(NaN or Inf\) at \[17\]",
            converted, tmp_path / "out")


FLOAT_TYPES = {"BF16": ml_dtypes.bfloat16, "F32": np.float32, "F8_E4M3": ml_dtypes.float8_e4m3fn}


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(sorted(FLOAT_TYPES)), shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       bad=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.sampled_from([np.nan, np.inf, -np.inf])),
                    max_size=3), chunk=st.integers(1, 40))
def test_non_finite_scan_finds_the_first_bad_element_across_chunk_boundaries(dtype, shape, bad, chunk):
    """The chunked bit test against numpy's own isfinite on the decoded values."""
    values = np.random.default_rng(len(bad)).normal(0, 100, shape).astype(np.float32)
    for where, value in bad:
        values.reshape(-1)[int(where * values.size)] = value
    array = values.astype(FLOAT_TYPES[dtype])
    not_finite = ~np.isfinite(array.astype(np.float32))
    want = [int(i) for i in np.argwhere(not_finite)[0]] if not_finite.any() else None
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(layout_module, "_CHECK_ELEMENTS", chunk)
        assert layout_module.first_non_finite(array, dtype) == want


def test_non_finite_scan_of_a_large_tensor_needs_no_copy_of_it():
    """Bounded host memory: checking a 64 MiB tensor allocates a few MiB of scratch, not a copy."""
    array = np.zeros((4096, 8192), ml_dtypes.bfloat16)
    array[4000, 17] = np.inf
    tracemalloc.start()
    try:
        assert layout_module.first_non_finite(array, "BF16") == [4000, 17]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, peak


# ---------------------------------------------------------------------------- format
NORM = "layers.2.attn_norm.weight"


def gap(header):
    for info in header.values():
        if isinstance(info, dict) and "data_offsets" in info:
            info["data_offsets"] = [o + 8 for o in info["data_offsets"]]
    return header


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: open(p, "ab").write(b"\0" * 16), r"16 trailing bytes after the last tensor"),
    (lambda p: (rewrite_header(p, gap), open(p, "r+b").truncate(p.stat().st_size + 8)),  # data shifted by 8
     r"8 unused bytes before tensor"),
    (lambda p: rewrite_header(p, lambda h: h, pad=b"\t"), r"header is not laid out as the safetensors library"),
    (lambda p: rewrite_header(p, lambda h: json.dumps(h, indent=1).encode()), r"header is not laid out as"),
    (lambda p: rewrite_header(p, lambda h: json.dumps(h, separators=(",", ":")).encode()[:-1] + b',"'
                              + NORM.encode() + b'":' + json.dumps(h[NORM]).encode() + b"}"),
     rf"header is not valid JSON: key '{NORM}' appears twice"),
    (lambda p: rewrite_header(p, lambda h: {"__metadata__": {"format": 1}, **h}), r"__metadata__ must map strings"),
    (lambda p: rewrite_header(p, lambda h: {**h, NORM: {**h[NORM], "dtype": "bf16"}}),
     rf"tensor {NORM} has dtype 'bf16'"),
])
def test_file_looser_than_the_safetensors_format_is_refused(src, tmp_path, corrupt, message):
    path = file_of(src, NORM)
    corrupt(path)
    refused(lambda: convert(src, tmp_path / "out" / "conv", progress=False), rf"{path.name}: {message}", src,
            tmp_path / "out")


def test_a_key_given_twice_is_refused_in_index_and_config(src, tmp_path):
    text = (src / INDEX).read_text()
    (src / INDEX).write_text(text.replace('"weight_map": {', '"weight_map": {"norm.weight": "x.safetensors", ', 1))
    refused(lambda: convert(src, tmp_path / "out", progress=False),
            rf"{INDEX}: cannot read the index: key 'norm\.weight' appears twice", src, tmp_path)
    (src / INDEX).write_text(text)
    config = (src / "config.json").read_text()
    (src / "config.json").write_text(config.replace("{", '{"vocab_size": 7, ', 1))
    refused(lambda: convert(src, tmp_path / "out", progress=False),
            r"config\.json: cannot read config: ValueError: key 'vocab_size' appears twice", src, tmp_path)


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path):
    from v4jax import load_pretrained

    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty: not a checkpoint folder \(neither a published"):
        load_pretrained(tmp_path / "empty")


def test_config_that_disagrees_with_the_weights_names_tensor_and_key(src, tmp_path):
    raw = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**raw, "q_lora_rank": 256}))
    refused(lambda: convert(src, tmp_path / "out", progress=False),
            r"tensor layers\.0\.attn\.wq_a\.weight has shape \[128, 128\], expected \[256, 128\]; its axis 0 "
            r"follows config key 'q_lora_rank'", src, tmp_path)


# ---------------------------------------------------------------------------- damaged converted folders
def biggest_data_file(folder: Path) -> Path:
    return max((p for p in (folder / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def test_flipped_byte_in_orbax_data_names_the_leaf(converted, tmp_path):
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    data = biggest_data_file(folder)
    with open(data, "r+b") as f:
        f.seek(data.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    refused(lambda: export(folder, tmp_path / "out" / "back", progress=False),
            r"state: leaf \S+ is damaged \(checksum [0-9a-f]{32}, recorded [0-9a-f]{32}\)", folder, tmp_path / "out")


@pytest.mark.parametrize("file", ["v4jax.json", "layout.json", "checksums.json", "state/_CHECKPOINT_METADATA",
                                  "state/state/_METADATA"])
def test_truncated_metadata_file_is_named(converted, tmp_path, file):
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    text = (folder / file).read_bytes()
    (folder / file).write_bytes(text[:len(text) // 2])
    refused(lambda: export(folder, tmp_path / "out" / "back", progress=False),
            rf"{file}: (cannot read: JSONDecodeError|not a valid recorded file split|expected)", folder,
            tmp_path / "out")


def test_existing_destination_is_never_replaced(converted, pristine, tmp_path):
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "mine.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")  # a dangling symlink is a destination too
    for dst in (tmp_path / "dst", tmp_path / "link"):
        with pytest.raises(CheckpointError, match="already exists; refusing to overwrite"):
            export(converted, dst, progress=False)
        with pytest.raises(CheckpointError, match="already exists; refusing to overwrite"):
            convert(pristine, dst, progress=False)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["mine.txt"]
    assert (tmp_path / "link").is_symlink() and not (tmp_path / "nowhere").exists()


# ---------------------------------------------------------------------------- killed runs
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_rerun_clears_the_staging_folder_of_a_dead_run_and_leaves_a_live_one(converted, tmp_path, caplog):
    import socket

    out = tmp_path / "out"
    out.mkdir()
    for tag, pid, host in (("dead", dead_pid(), socket.gethostname()), ("live", os.getpid(), socket.gethostname()),
                           ("elsewhere", dead_pid(), "another-host")):
        stale = out / f".back.tmp-{tag}"
        (stale / "junk").mkdir(parents=True)
        (stale / OWNER).write_text(json.dumps({"host": host, "pid": pid}))
    with caplog.at_level(logging.WARNING, logger="v4jax.checkpoint.staging"):
        export(converted, out / "back", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [".back.tmp-elsewhere", ".back.tmp-live", "back"]
    assert "removed the staging folder of an earlier run that died" in caplog.text and ".back.tmp-dead" in caplog.text


@pytest.mark.slow
def test_sigkilled_convert_leaves_a_staging_folder_that_the_rerun_clears(pristine, tmp_path):
    dst = tmp_path / "conv"
    script = (f"from v4jax.checkpoint import converter as c\n"
              f"c._SAVE_BYTES = 100_000\n"  # many saves: time to be killed mid-way
              f"c.convert({str(pristine)!r}, {str(dst)!r}, progress=False)\n")
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while not list(tmp_path.glob(".conv.tmp-*/" + OWNER)) and time.time() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert list(tmp_path.glob(".conv.tmp-*")) and not dst.exists()
    rerun = subprocess.run([sys.executable, "-c", script.replace("c._SAVE_BYTES = 100_000\n", "")],
                           capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "removed the staging folder of an earlier run that died" in rerun.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


# ---------------------------------------------------------------------------- training saves
def test_training_save_records_checksums_and_a_damaged_step_names_the_leaf(tmp_path):
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from v4jax import train

    def fresh(seed):
        model = nnx.Linear(64, 32, rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    model, opt = fresh(0)
    checkpoints = train.Checkpoints(tmp_path / "run")
    checkpoints.save(5, model, opt)
    other, other_opt = fresh(1)
    assert checkpoints.restore(other, other_opt) == 5
    assert np.array_equal(np.asarray(other.kernel[...]), np.asarray(model.kernel[...]))

    data = max((p for p in (tmp_path / "run").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    kernel = np.asarray(model.kernel[...]).tobytes()
    at = raw.find(kernel[:64])  # uncompressed: the kernel's bytes are in the file as they are
    assert at >= 0
    raw[at + 1000] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"run step 5: leaf \['model'\]\['kernel'\] is damaged"):
        checkpoints.restore(*fresh(2))
    assert checkpoints.latest_step() == 5
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train.Checkpoints(tmp_path / "empty").restore(*fresh(3))
    assert not jnp.isnan(other.kernel[...]).any()


# ---------------------------------------------------------------------------- probing beyond the listed classes


def test_output_inside_its_source_folder_is_refused(src, converted, tmp_path):
    refused(lambda: convert(src, src / "conv", progress=False), r"inside the source folder", src, src)
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    refused(lambda: export(folder, folder / "sub" / "back", progress=False), r"inside the source folder", folder,
            folder)
    (tmp_path / "alias").symlink_to(src)  # the same folder under another name
    refused(lambda: convert(src, tmp_path / "alias" / "conv", progress=False), r"inside the source folder", src, src)


def test_a_converted_folder_given_to_convert_and_a_published_one_to_export_say_what_they_are(src, converted,
                                                                                               tmp_path):
    refused(lambda: convert(converted, tmp_path / "out" / "x", progress=False),
            r"conv\S*: a converted v4jax checkpoint, not a published one", converted, tmp_path / "out")
    refused(lambda: export(src, tmp_path / "out" / "x", progress=False),
            r"src: a published checkpoint folder, not a converted one", src, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    refused(lambda: convert(tmp_path / "empty", tmp_path / "out" / "x", progress=False),
            r"empty: not a published checkpoint folder \(no model\.safetensors\.index\.json\)", tmp_path / "empty",
            tmp_path / "out")


@pytest.mark.parametrize("file", ["config.json", INDEX, "tokenizer.json"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_in_place_of_a_json_file_is_refused_not_read_forever(src, tmp_path, file, kind):
    (src / file).unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(src / file)
    else:
        (src / file).symlink_to("/dev/zero")
    with time_limit(60):
        refused(lambda: convert(src, tmp_path / "out" / "conv", progress=False),
                rf"{re.escape(file)}: cannot read.*not a regular file", src, tmp_path / "out")


@pytest.mark.parametrize("file, text, message", [
    ("tokenizer.json", b"not json", r"cannot read: JSONDecodeError"),
    ("tokenizer.json", b'{"model": 1, "model": 2}', r"cannot read: ValueError: key 'model' appears twice"),
    ("tokenizer_config.json", b"\xff\xfe{}", r"cannot read: UnicodeDecodeError"),
    ("generation_config.json", b"[1]", r"expected a JSON object, got list"),
])
def test_a_companion_file_that_is_not_a_json_object_is_refused_before_anything_is_written(src, converted, tmp_path,
                                                                                            file, text, message):
    (src / file).write_bytes(text)
    refused(lambda: convert(src, tmp_path / "out" / "conv", progress=False), rf"{file}: {message}", src,
            tmp_path / "out")
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    (folder / file).write_bytes(text)
    refused(lambda: export(folder, tmp_path / "out" / "back", progress=False), rf"{file}: {message}", folder,
            tmp_path / "out")


def test_a_full_disk_is_one_error_naming_the_file_and_leaves_nothing(src, converted, tmp_path, monkeypatch):
    import errno

    from orbax.checkpoint.experimental import v1 as ocp

    from v4jax.checkpoint import safetensors_format

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as mp:
        mp.setattr(safetensors_format.os, "pwrite", full)
        refused(lambda: export(converted, tmp_path / "out" / "back", progress=False),
                r"model-\d{5}-of-\d{5}\.safetensors: cannot write: No space left on device", converted,
                tmp_path / "out")

    class Failing:  # what Orbax's save hands back when tensorstore cannot write
        def result(self):
            raise ValueError('RESOURCE_EXHAUSTED: Failed writing: "d/0": No space left on device')

    with monkeypatch.context() as mp:
        mp.setattr(ocp.partial, "save_async", lambda path, batch: Failing())
        refused(lambda: convert(src, tmp_path / "out" / "conv", progress=False),
                r"\.conv\.tmp-[0-9a-f]+/state: cannot write: ValueError: RESOURCE_EXHAUSTED: .*No space left",
                src, tmp_path / "out")


def test_concurrent_runs_into_one_destination_keep_the_first_output_and_leave_no_staging(tmp_path):
    from v4jax.checkpoint.staging import staging

    dst = tmp_path / "out"
    with pytest.raises(CheckpointError, match="already exists; refusing to overwrite"):
        with staging(dst) as slow:
            (slow / "mine").write_text("slow")
            with staging(dst) as fast:  # a second run for the same destination finishes first
                (fast / "mine").write_text("fast")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (dst / "mine").read_text() == "fast"


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_ctrl_c_mid_convert_exits_130_in_one_line_and_leaves_nothing(pristine, tmp_path, delay):
    """Orbax keeps writing in background threads: the interrupted run waits for them before it
    removes its staging folder, or they would write part of it back."""
    dst = tmp_path / "conv"
    script = (f"from v4jax.checkpoint import converter as c\n"
              f"c._SAVE_BYTES = 100_000\n"  # many saves: the interrupt lands mid-way
              f"from v4jax.cli.main import main\n"
              f"main(['convert', {str(pristine)!r}, {str(dst)!r}])\n")
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".conv.tmp-*/state*")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    time.sleep(1)  # a straggling background write would show up here
    assert child.returncode == 130, err
    assert [line for line in err.splitlines() if line and "B/s" not in line][-1] == "v4jax convert: interrupted"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_refused_conversion_removes_the_folders_it_made_for_its_destination(src, tmp_path):
    poke(src, "norm.weight", 0, np.array(np.inf, ml_dtypes.bfloat16).tobytes())
    (tmp_path / "kept").mkdir()
    with pytest.raises(CheckpointError, match="holds a non-finite value"):
        convert(src, tmp_path / "kept" / "a" / "b" / "conv", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "src"] and not any((tmp_path / "kept").iterdir())


def test_a_converted_folder_whose_config_was_edited_names_the_first_leaf_that_disagrees(converted, tmp_path):
    folder = Path(shutil.copytree(converted, tmp_path / "conv"))
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "vocab_size": 1024}))
    refused(lambda: export(folder, tmp_path / "out" / "back", progress=False),
            r"state: cannot restore: leaf embed\.weight is stored as bfloat16\[512, 128\]; config\.json and "
            r"v4jax\.json describe bfloat16\[1024, 128\]", folder, tmp_path / "out")
