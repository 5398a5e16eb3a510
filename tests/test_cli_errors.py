"""A user's mistake on the command line: one line `v4jax VERB: ...` on stderr, exit 2 (usage) or
1 (data), no traceback, nothing written; cheap checks fail before any model loads."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from v4jax import cli
from v4jax.cli import eval as cli_eval
from v4jax.cli import generate as cli_generate
from v4jax.cli import train as cli_train
from v4jax.cli.main import build_parser
from v4jax.errors import DataError


@pytest.fixture
def no_model(monkeypatch):
    """Any verb that gets as far as loading a model fails the test."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    for verb in (cli_generate, cli_eval, cli_train):
        monkeypatch.setattr(verb, "load_model", load_model)


def fails(capsys, argv, code):
    """Run `v4jax argv`; its exit code must be `code`; returns its single stderr line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code, err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err.rstrip("\n")


@pytest.fixture(scope="module")
def no_tokenizer(word_ckpt, tmp_path_factory):
    """The published tiny checkpoint without its tokenizer.json."""
    path = tmp_path_factory.mktemp("ckpt") / "no-tokenizer"
    shutil.copytree(word_ckpt, path, ignore=shutil.ignore_patterns("tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def limited(word_ckpt, tmp_path_factory):
    """The published tiny checkpoint whose config.json says max_position_embeddings: 64."""
    path = tmp_path_factory.mktemp("ckpt") / "limited"
    shutil.copytree(word_ckpt, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 64}))
    return path


def jsonl(tmp_path, raw: bytes, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(raw)
    return path


# ---------------------------------------------------------------------------- arguments (parse time, exit 2)
BAD_ARGUMENTS = [
    (["generate", "--ids", "1,,2"], "argument --ids: expected token ids such as 1,2,3; '' in '1,,2' is not a "
                                    "non-negative integer"),
    (["generate", "--ids", ""], "argument --ids: expected token ids such as 1,2,3, got ''"),
    (["generate", "--ids", "1,-2"], "argument --ids: expected token ids such as 1,2,3; '-2' in '1,-2' is not a "
                                    "non-negative integer"),
    (["generate", "--ids", "1", "--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1, "
                                                          "got '0'"),
    (["generate", "--ids", "1", "--temperature", "-0.5"], "argument --temperature: expected a finite number >= 0, "
                                                          "got '-0.5'"),
    (["generate", "--ids", "1", "--top-p", "0"], "argument --top-p: expected a probability in (0, 1], got '0'"),
    (["generate", "--ids", "1", "--top-k", "x"], "argument --top-k: expected an integer >= 0, got 'x'"),
    (["eval", "--data", "{data}", "--max-len", "1"], "argument --max-len: expected an integer >= 2, got '1'"),
    (["eval", "--data", "{data}", "--max-len", "0"], "argument --max-len: expected an integer >= 2, got '0'"),
    (["eval", "--data", "{data}", "--batch", "0"], "argument --batch: expected an integer >= 1, got '0'"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--seq-len", "0"],
     "argument --seq-len: expected an integer >= 2, got '0'"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--batch", "0"],
     "argument --batch: expected an integer >= 1, got '0'"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--save-every", "0"],
     "argument --save-every: expected an integer >= 1, got '0'"),
    (["train", "--data", "{data}", "--out", "{tmp}/run", "--lr", "nan"],
     "argument --lr: expected a finite number > 0, got 'nan'"),
    (["generate", "--ids", "1", "--seed", str(2**63)], f"argument --seed: expected an integer in [0, {2**63 - 1}], "
                                                      f"got '{2**63}'"),
    (["eval", "--data", "{tmp}/missing.jsonl"], "argument --data: {tmp}/missing.jsonl: no such file"),
    (["eval", "--data", "{tmp}"], "argument --data: {tmp}: is a folder, not a file"),
    (["eval", "--data", "{data}", "--moe-impl", "dense"],
     "argument --moe-impl: invalid choice: 'dense' (choose from 'ragged', 'tiled', 'looped', 'gather')"),
]


@pytest.mark.parametrize("argv, message", BAD_ARGUMENTS, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_bad_arguments_are_one_line_usage_errors(word_ckpt, tmp_path, capsys, no_model, argv, message):
    data = jsonl(tmp_path, b'{"ids": [1, 2, 3]}\n')
    fill = lambda s: s.format(data=data, tmp=tmp_path)
    argv = [fill(a) for a in argv]
    verb = argv[0]
    argv = [verb, "--ckpt", str(word_ckpt), *argv[1:]] if verb != "convert" else argv
    assert fails(capsys, argv, 2) == f"v4jax {verb}: {fill(message)} (see v4jax {verb} --help)"
    assert not (tmp_path / "run").exists()


def test_existing_output_folders_and_missing_sources_are_refused_before_anything_runs(word_ckpt, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    err = fails(capsys, ["convert", str(word_ckpt), str(tmp_path / "taken")], 2)
    assert err == (f"v4jax convert: argument dst: {tmp_path}/taken: already exists; refusing to overwrite "
                   f"(see v4jax convert --help)")
    err = fails(capsys, ["export", str(tmp_path / "nowhere"), str(tmp_path / "out")], 2)
    assert err == f"v4jax export: argument src: {tmp_path}/nowhere: no such folder (see v4jax export --help)"
    (tmp_path / "file").write_text("x")
    err = fails(capsys, ["convert", str(word_ckpt), str(tmp_path / "file" / "out")], 2)
    assert err.startswith(f"v4jax convert: argument dst: {tmp_path}/file: not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "taken"] and not any((tmp_path / "taken").iterdir())


def test_user_paths_are_made_absolute_once_at_the_boundary(word_ckpt, monkeypatch):
    monkeypatch.chdir(word_ckpt)
    args = build_parser().parse_args(["train", "--ckpt", ".", "--data", "tokenizer.json", "--out", "run"])
    assert args.ckpt == word_ckpt and args.data == word_ckpt / "tokenizer.json" and args.out == word_ckpt / "run"
    monkeypatch.chdir(word_ckpt.parent)
    args = build_parser().parse_args(["generate", "--ckpt", word_ckpt.name, "--ids", "1"])
    assert args.ckpt == word_ckpt and args.ckpt.is_absolute()


def test_convert_and_export_between_relative_folders_round_trip(word_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(word_ckpt, "published")
    cli.main(["convert", "published", "converted"])
    cli.main(["export", "converted", "back"])
    for f in sorted((tmp_path / "published").glob("*.safetensors")):
        assert (tmp_path / "back" / f.name).read_bytes() == f.read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left


# ---------------------------------------------------------------------------- checked before the model loads
def test_generate_checks_ids_prompts_tokenizer_and_mesh_before_loading(word_ckpt, no_tokenizer, limited, capsys,
                                                                       no_model):
    g = ["generate", "--ckpt", str(word_ckpt)]
    assert fails(capsys, g, 2) == "v4jax generate: give --prompt TEXT or --ids 1,2,3"
    assert fails(capsys, [*g, "--ids", "1,2,600"], 1) == ("v4jax generate: --ids 1,2,600: token id 600 (position 2) "
                                                         "is outside the vocabulary [0, 512)")
    err = fails(capsys, ["generate", "--ckpt", str(limited), "--ids", "1", "--prompt", " ".join(["w5"] * 65)], 1)
    assert err == "v4jax generate: --prompt 'w5 w5 w5 w5 w5 w5 w5 w5 w5 w5 ': 65 tokens; the checkpoint's " \
                  "max_position_embeddings is 64"
    assert fails(capsys, [*g, "--prompt", ""], 2) == "v4jax generate: --prompt '': empty prompt"
    assert fails(capsys, [*g, "--ids", "1", "--mesh", "data=16"], 2) == (
        "v4jax generate: mesh spec 'data=16' needs 16 devices; 8 are available")
    assert fails(capsys, [*g, "--ids", "1", "--mesh", "dta=2"], 2).startswith(
        "v4jax generate: mesh spec 'dta=2': unknown axis 'dta'")
    assert fails(capsys, [*g, "--ids", "1", "--mesh", "data=2,expert=4"], 2) == (
        "v4jax generate: a batch of 1 sequences: dim 0 ('batch') of size 1 does not divide by mesh axes ('data',) "
        "of size 2 (shape (1,))")
    assert fails(capsys, [*g, "--prompt", "w5 \udcff"], 2) == "v4jax generate: --prompt 'w5 \\udcff': not valid UTF-8"
    err = fails(capsys, ["generate", "--ckpt", str(no_tokenizer), "--prompt", "w5 w9"], 1)
    assert err == f"v4jax generate: {no_tokenizer}: has no tokenizer.json; give --ids instead of --prompt"


def test_a_folder_that_is_no_checkpoint_is_named(tmp_path, capsys, no_model):
    err = fails(capsys, ["generate", "--ckpt", str(tmp_path), "--ids", "1"], 1)
    assert err == (f"v4jax generate: {tmp_path}: not a checkpoint folder (neither a published one with "
                   "model.safetensors.index.json nor a converted v4jax one)")
    err = fails(capsys, ["export", str(tmp_path), str(tmp_path / "out")], 1)
    assert err.startswith(f"v4jax export: {tmp_path}: not a checkpoint folder")
    assert not any(tmp_path.iterdir())


def test_eval_reads_and_checks_its_data_before_loading(word_ckpt, limited, tmp_path, capsys, no_model):
    e = ["eval", "--ckpt", str(word_ckpt), "--data"]
    rows = jsonl(tmp_path, b'{"ids": [1, 2]}\n{"ids": [3, 600]}\n')
    assert fails(capsys, [*e, str(rows)], 1) == (f"v4jax eval: {rows}:2: field 'ids': token id 600 (position 1) is "
                                                 "outside the vocabulary [0, 512)")
    rows = jsonl(tmp_path, b'{"text": "w1 w2"}\n{"text": "\xff"}\n')
    assert fails(capsys, [*e, str(rows)], 1) == f"v4jax eval: {rows}:2: not UTF-8 (byte 10: b'\\xff')"
    rows = jsonl(tmp_path, b'{"ids": [1]}\n{"ids": [3]}\n')
    assert fails(capsys, [*e, str(rows)], 1) == f"v4jax eval: {rows}: no document has two or more tokens to score"
    assert fails(capsys, [*e, str(rows), "--mesh", "data=2,expert=4", "--batch", "3"], 1).startswith(
        "v4jax eval: ")  # the data is checked first
    rows = jsonl(tmp_path, b'{"ids": [1, 2]}\n')
    assert fails(capsys, [*e, str(rows), "--mesh", "data=2,expert=4", "--batch", "3"], 2) == (
        "v4jax eval: --batch: dim 0 ('batch') of size 3 does not divide by mesh axes ('data',) of size 2 (shape (3,))")
    rows = jsonl(tmp_path, b'{"context": [1], "continuation": [2]}\n{"context": [1]}\n')
    assert fails(capsys, [*e, str(rows)], 1) == (f"v4jax eval: {rows}:2: a scoring record needs 'context' and "
                                                 "'continuation' (missing 'continuation')")
    e = ["eval", "--ckpt", str(limited), "--data"]
    rows = jsonl(tmp_path, json.dumps({"context": [1] * 60, "continuation": [2] * 5}).encode())
    assert fails(capsys, [*e, str(rows)], 1) == (f"v4jax eval: {rows}:1: context + continuation are 65 tokens; "
                                                 "the model takes at most 64")
    assert fails(capsys, [*e, str(rows), "--max-len", "65"], 2) == (
        "v4jax eval: --max-len 65 exceeds the checkpoint's max_position_embeddings 64")


def test_train_refuses_too_little_data_before_loading_and_writes_nothing(word_ckpt, limited, tmp_path, capsys,
                                                                         no_model):
    rows = jsonl(tmp_path, b'{"text": "w1 w2 w3"}\n')
    t = ["train", "--ckpt", str(word_ckpt), "--data", str(rows), "--out", str(tmp_path / "run")]
    assert fails(capsys, [*t, "--seq-len", "4", "--batch", "2"], 1) == (
        "v4jax train: data packs into 1 rows of 4 tokens: fewer than one batch of 2")  # w1 w2 w3, no EOS named
    t[2] = str(limited)
    assert fails(capsys, [*t, "--seq-len", "65"], 2) == (
        "v4jax train: --seq-len 65 exceeds the checkpoint's max_position_embeddings 64")
    assert not (tmp_path / "run").exists()
    err = fails(capsys, ["train", "--ckpt", str(word_ckpt), "--data", str(rows), "--out", str(word_ckpt)], 2)
    assert err == (f"v4jax train: --out {word_ckpt}: not empty and holds no training checkpoints; refusing to "
                   "write into it")


# ---------------------------------------------------------------------------- the error path itself
def test_interrupt_debug_and_bugs(word_ckpt, capsys, monkeypatch):
    argv = ["generate", "--ckpt", str(word_ckpt), "--ids", "1,2"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_generate, "load_model", interrupted)
    assert fails(capsys, argv, 130) == "v4jax generate: interrupted"
    with pytest.raises(DataError, match="token id 600"):  # --debug: the error itself, with its traceback
        cli.main(["--debug", *argv[:-1], "1,600"])
    with pytest.raises(DataError, match="token id 600"):  # also after the verb
        cli.main([*argv[:-1], "1,600", "--debug"])

    def bug(*args, **kwargs):
        raise RuntimeError("a bug in v4jax")

    monkeypatch.setattr(cli_generate, "load_model", bug)
    with pytest.raises(RuntimeError, match="a bug in v4jax"):  # not a user's mistake: the traceback stays
        cli.main(argv)
    assert fails(capsys, ["--process-id", "1", *argv], 2) == (
        "v4jax: --coordinator, --num-processes and --process-id go with --distributed")


# ---------------------------------------------------------------------------- convert / export / demo boundary
def test_convert_into_its_source_or_to_a_non_utf8_path_is_one_line_and_writes_nothing(word_ckpt, tmp_path, capsys):
    src = Path(shutil.copytree(word_ckpt, tmp_path / "src"))
    before = sorted(p.name for p in src.iterdir())
    assert fails(capsys, ["convert", str(src), str(src / "conv")], 1) == (
        f"v4jax convert: {src}/conv: inside the source folder {src}; write the output elsewhere")
    odd = tmp_path / "out\udcff"  # a file name byte that is not UTF-8, as Python hands it over
    assert fails(capsys, ["convert", str(src), str(odd)], 1).endswith(
        "not a UTF-8 path, which Orbax cannot write or read; rename it")
    assert sorted(p.name for p in src.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_demo_refuses_more_new_tokens_than_the_tiny_model_can_position(capsys):
    assert fails(capsys, ["demo", "--max-new-tokens", "3797"], 2) == (
        "v4jax demo: --max-new-tokens 3797: prompts of up to 300 tokens and that many more exceed the tiny "
        "model's max_position_embeddings 4096")


def test_a_full_disk_is_a_one_line_data_error():
    from v4jax.cli.main import exit_code, message

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert exit_code(full) == 1 and message(full) == "No space left on device"
    named = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), "/x/" + "a" * 300)
    assert exit_code(named) == 1 and message(named).endswith(": File name too long")
    assert exit_code(OSError(errno.EBADF, "Bad file descriptor")) is None  # no path, no disk: a bug
