"""Published-folder validation: every bad input stops with a CheckpointError naming file and
tensor before anything is written; windowed reads; the writer matches the safetensors library."""

import json
import shutil
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save, save_file

from v4jax.checkpoint import CheckpointError, convert, read_published, write_random_checkpoint
from v4jax.checkpoint import converter
from v4jax.checkpoint import reader
from v4jax.checkpoint.safetensors_format import ShardWriter

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_random_checkpoint(CONFIGS / "tiny.json", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def src(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "src"))


# ---------------------------------------------------------------------------- corruption helpers
def file_of(folder: Path, name: str) -> str:
    return json.loads((folder / INDEX).read_text())["weight_map"][name]


def tensors_in(folder: Path, file: str) -> dict[str, np.ndarray]:
    published = read_published(folder)
    return {n: published.read(n) for n, loc in published.tensors.items() if loc.file.name == file}


def edit_index(folder: Path, edit) -> None:
    index = json.loads((folder / INDEX).read_text())
    edit(index)
    (folder / INDEX).write_text(json.dumps(index))


def edit_file(folder: Path, name: str, edit) -> None:
    """Rewrite the file holding `name` after `edit(tensors)`."""
    file = file_of(folder, name)
    tensors = tensors_in(folder, file)
    edit(tensors)
    save_file(tensors, folder / file)


def edit_header(path: Path, edit) -> None:
    """Rewrite a header in place (same length), leaving the data untouched."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])


def poke(folder: Path, name: str, at: int, data: bytes) -> None:
    loc = read_published(folder).tensors[name]
    with open(loc.file, "r+b") as f:
        f.seek(loc.offset + at)
        f.write(data)


def outside_file(folder: Path) -> Path:
    target = folder.parent / "outside.safetensors"
    shutil.copyfile(folder / "model-00001-of-00009.safetensors", target)
    return target


def overlap(folder: Path) -> None:
    def edit(header):
        header["layers.0.ffn.experts.1.w1.weight"]["data_offsets"] = header["layers.0.ffn.experts.0.w1.weight"][
            "data_offsets"]
    edit_header(folder / file_of(folder, "layers.0.ffn.experts.0.w1.weight"), edit)


def truncate(folder: Path, file: str, size: int) -> None:
    with open(folder / file, "r+b") as f:
        f.truncate(size if size >= 0 else (folder / file).stat().st_size + size)


def unknown_tensor(folder: Path, listed: bool) -> None:
    edit_file(folder, "layers.0.attn_norm.weight",
              lambda t: t.update({"layers.0.attn.foo": np.zeros(4, np.float32)}))
    if listed:
        file = file_of(folder, "layers.0.attn_norm.weight")
        edit_index(folder, lambda i: i["weight_map"].update({"layers.0.attn.foo": file}))


SCALE = "layers.1.attn.wq_a.scale"
L1 = "model-00003-of-00009.safetensors"
CASES = {
    "unknown tensor": (lambda s: unknown_tensor(s, True), rf"{INDEX}: unknown tensor layers\.0\.attn\.foo"),
    "unlisted tensor": (lambda s: unknown_tensor(s, False),
                        r"model-00002-of-00009\.safetensors: tensor layers\.0\.attn\.foo is not listed"),
    "missing tensor": (lambda s: (edit_file(s, SCALE, lambda t: t.pop(SCALE)),
                                  edit_index(s, lambda i: i["weight_map"].pop(SCALE))),
                       rf"{INDEX}: tensor {SCALE} is missing"),
    "missing from its file": (lambda s: edit_file(s, SCALE, lambda t: t.pop(SCALE)),
                              rf"{L1}: tensor {SCALE} is missing \(the index lists it here\)"),
    "wrong dtype": (lambda s: edit_file(s, SCALE, lambda t: t.update({SCALE: t[SCALE].astype(np.float32)})),
                    rf"{L1}: tensor {SCALE} has dtype F32, expected F8_E8M0"),
    "wrong shape": (lambda s: edit_file(s, "layers.1.attn_norm.weight", lambda t: t.update(
        {"layers.1.attn_norm.weight": np.ones(64, ml_dtypes.bfloat16)})),
                    rf"{L1}: tensor layers\.1\.attn_norm\.weight has shape \[64\], expected \[128\]"),
    "truncated data": (lambda s: truncate(s, "model-00009-of-00009.safetensors", -100),
                       r"model-00009-of-00009\.safetensors: truncated: tensor mtp\.0\.ffn\.experts\.7\.w3\.weight"),
    "truncated header": (lambda s: truncate(s, "model-00004-of-00009.safetensors", 5),
                         r"model-00004-of-00009\.safetensors: truncated or corrupt header"),
    "bad header": (lambda s: poke(s, "embed.weight", -read_published(s).tensors["embed.weight"].offset + 8,
                                  b"{not json"),
                   r"model-00001-of-00009\.safetensors: header is not valid JSON"),
    "overlapping offsets": (overlap, r"model-00002-of-00009\.safetensors: tensor layers\.0\.ffn\.experts\.[01]\.w1"
                                     r"\.weight overlaps tensor layers\.0\.ffn\.experts\.[01]\.w1\.weight"),
    "NaN scale": (lambda s: poke(s, "layers.2.ffn.experts.3.w2.scale", 5, b"\xff"),
                  r"model-00004-of-00009\.safetensors: tensor layers\.2\.ffn\.experts\.3\.w2\.scale has scale nan"),
    "bad expert id": (lambda s: poke(s, "layers.0.ffn.gate.tid2eid", 8, np.int64(8).tobytes()),
                      r"tensor layers\.0\.ffn\.gate\.tid2eid holds expert ids outside 0\.\.7"),
    "absolute path": (lambda s: edit_index(s, lambda i: i["weight_map"].update({"embed.weight": str(outside_file(s))})),
                      rf"{INDEX}: weight_map\['embed\.weight'\] names '/.*outside\.safetensors'; expected a plain file name"),
    "parent path": (lambda s: (outside_file(s), edit_index(s, lambda i: i["weight_map"].update(
        {"embed.weight": "../outside.safetensors"}))),
                    rf"{INDEX}: weight_map\['embed\.weight'\] names '\.\./outside\.safetensors'; expected a plain"),
    "missing file": (lambda s: (s / "model-00005-of-00009.safetensors").unlink(),
                     rf"{INDEX}: tensor layers\.3\.hc_attn_base points to 'model-00005-of-00009\.safetensors', which "
                     "does not exist"),
    "wrong total_size": (lambda s: edit_index(s, lambda i: i["metadata"].update({"total_size": 1})),
                         rf"{INDEX}: metadata\.total_size is 1, expected 4250498"),
    "unknown config key": (lambda s: (s / "config.json").write_text(
        json.dumps({**json.loads((s / "config.json").read_text()), "dspark_heads": 3})),
                           r"config\.json: unknown key 'dspark_heads'"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_checkpoint_stops_before_anything_is_written(src, tmp_path, case):
    corrupt, message = CASES[case]
    corrupt(src)
    dst = tmp_path / "out" / "converted"
    with pytest.raises(CheckpointError, match=message):
        convert(src, dst, progress=False)
    assert not (tmp_path / "out").exists()


def test_float32_scale_that_is_not_a_power_of_two_is_refused(tmp_path):
    src = write_random_checkpoint(CONFIGS / "tiny-pro-base.json", tmp_path / "base")
    poke(src, "layers.3.ffn.experts.2.w1.scale", 0, np.float32(0.3).tobytes())
    with pytest.raises(CheckpointError, match=r"tensor layers\.3\.ffn\.experts\.2\.w1\.scale has scale 0\.3"):
        read_published(src)


def test_existing_destination_is_refused_and_left_alone(pristine, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(pristine, dst, progress=False)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_failure_while_writing_leaves_no_output_and_no_temporaries(pristine, tmp_path, monkeypatch):
    monkeypatch.setattr(converter, "_SAVE_BYTES", 1_000_000)  # several Orbax saves before the failure
    saves, calls = [], []
    monkeypatch.setattr(converter.ocp.partial, "save_async", _counting(converter.ocp.partial.save_async, saves))

    def sharding_for(name, shape):
        calls.append(name)
        if len(calls) == 250:
            raise RuntimeError("placement failed")
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    with pytest.raises(RuntimeError, match="placement failed"):
        convert(pristine, tmp_path / "out" / "converted", sharding_for=sharding_for, progress=False)
    assert len(saves) > 3
    assert not (tmp_path / "out").exists()  # not even the folder made for it


def _counting(fn, calls):
    def wrapped(*args, **kwargs):
        calls.append(args[0])
        return fn(*args, **kwargs)
    return wrapped


def test_windowed_reads_equal_slices_of_the_whole_tensor(pristine, monkeypatch):
    published = read_published(pristine)
    full = published.read("embed.weight")
    monkeypatch.setattr(reader, "_MAP_BYTES", 1000)  # many small maps per read
    window = published.read("embed.weight", (slice(3, 300), slice(5, 77)))
    assert np.array_equal(window.view(np.uint16), full[3:300, 5:77].view(np.uint16))


def test_written_files_equal_what_the_safetensors_library_writes(pristine, tmp_path):
    published = read_published(pristine)
    for shard in published.layout.shards:
        tensors = {n: published.read(n) for n in shard.tensors}
        assert (pristine / shard.file).read_bytes() == save(tensors)
    specs = [published.tensors[n].spec for n in published.layout.shards[1].tensors]
    with ShardWriter(tmp_path / "meta.safetensors", specs, {"format": "pt"}) as writer:
        for s in reversed(specs):  # any write order gives the same file
            writer.write(s.name, published.read(s.name))
    assert (tmp_path / "meta.safetensors").read_bytes() == save({s.name: published.read(s.name) for s in specs},
                                                                 metadata={"format": "pt"})
