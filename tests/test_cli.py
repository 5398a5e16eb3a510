"""`v4jax eval` and `v4jax train` on a mesh: the same numbers as the library on one device,
and a rerun of `train` resumes from its latest checkpoint."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from v4jax import cli, evaluate, load_pretrained, train

WORDS = [" ".join(f"w{(7 * i + 3 * j) % 500}" for j in range(n)) for i, n in enumerate((40, 25, 70))]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in WORDS))
    return path


def test_eval_on_a_mesh_gives_the_single_device_perplexity(word_ckpt, text_data, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    cli.main(["eval", "--ckpt", str(word_ckpt), "--data", str(text_data), "--max-len", "32", "--batch", "4",
              "--mesh", "data=2,expert=4", "--out", str(out)])
    got = json.loads(capsys.readouterr().out)
    documents = [[int(w[1:]) for w in t.split()] for t in WORDS]  # the word-level tokenizer: "w17" -> 17
    want = evaluate.perplexity(load_pretrained(word_ckpt), documents, 32, 4)
    assert got["tokens"] == want["tokens"] == sum(len(d) - 1 for d in documents)
    assert got["rows"] == got["rows_scored"] == 3 and 0 <= got["padded_fraction"] < 1
    # bf16 with FP8 activation quantisation: a reduction order that differs across devices may
    # flip an occasional rounding, so the mean log-likelihood agrees to bf16 round-off, not bitwise
    assert abs(np.log(got["perplexity"]) - np.log(want["perplexity"])) < 2e-3 * np.log(want["perplexity"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2] and [r["tokens"] for r in rows] == [len(d) - 1 for d in documents]
    assert np.isclose(-sum(r["loglikelihood"] for r in rows) / got["tokens"], np.log(got["perplexity"]))


def test_eval_with_each_moe_impl_gives_the_same_scores(word_ckpt, text_data, tmp_path, monkeypatch, capsys):
    """--moe-impl reaches the model, and each choice gives the same document log-likelihoods."""
    from v4jax.cli import eval as cli_eval

    impls, load = [], cli_eval.load_model

    def spy(*args, **kwargs):
        model, context = load(*args, **kwargs)
        impls.append(model.cfg.moe_impl)
        return model, context

    monkeypatch.setattr(cli_eval, "load_model", spy)
    got = {}
    for impl in ("tiled", "looped"):
        out = tmp_path / f"{impl}.jsonl"
        cli.main(["eval", "--ckpt", str(word_ckpt), "--data", str(text_data), "--max-len", "32", "--dtype", "float32",
                  "--no-quant-sim", "--moe-impl", impl, "--out", str(out)])
        capsys.readouterr()
        got[impl] = [json.loads(line)["loglikelihood"] for line in out.read_text().splitlines()]
    assert impls == ["tiled", "looped"]
    np.testing.assert_allclose(got["tiled"], got["looped"], rtol=1e-5)


PAIRS = [{"context": f"w{i} w{i + 1} w{i + 2}" * (1 + i % 3), "continuation": f" w{(5 * i) % 500}"} for i in range(7)]


def test_eval_rerun_scores_only_missing_rows_and_drops_a_torn_line(word_ckpt, tmp_path, capsys, monkeypatch):
    """A results file cut after two rows and a half-written third (what SIGKILL leaves): the rerun
    keeps the two lines as they are, scores the other five rows only and ends with the file an
    uninterrupted run writes."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    argv = ["eval", "--ckpt", str(word_ckpt), "--data", str(data), "--dtype", "float32", "--no-quant-sim",
            "--logprobs", "--batch-tokens", "32"]
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    cli.main([*argv, "--out", str(full)])
    assert json.loads(capsys.readouterr().out)["rows_scored"] == 7
    lines = full.read_text().splitlines(keepends=True)
    cli.main(argv)  # no --out: the same lines on stdout, the summary on stderr
    streams = capsys.readouterr()
    assert streams.out.splitlines(keepends=True) == lines
    assert json.loads(streams.err.splitlines()[-1])["rows"] == 7
    part.write_text(lines[4] + lines[1] + lines[2][:25])
    scored = []
    score = evaluate.score

    def recording(model, windows, *args, **kwargs):
        scored.extend(w.row for w in windows)
        return score(model, windows, *args, **kwargs)

    monkeypatch.setattr(evaluate, "score", recording)
    cli.main([*argv, "--out", str(part)])
    summary = json.loads(capsys.readouterr().out)
    assert sorted(scored) == [0, 2, 3, 5, 6] and summary["rows_scored"] == 5 and summary["rows"] == 7
    again = part.read_text().splitlines(keepends=True)
    assert again[4] == lines[4] and again[1] == lines[1]  # kept, not rescored
    for a, b in zip(again, lines, strict=True):
        a, b = json.loads(a), json.loads(b)
        assert a.keys() == b.keys() and a["row"] == b["row"] and a["tokens"] == b["tokens"]
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.jsonl").write_text('{"row": 0, "loglikelihood": -1, "tokens": 99, "is_greedy": false}\n')
    with pytest.raises(SystemExit):
        cli.main([*argv, "--out", str(tmp_path / "bad.jsonl")])
    assert "bad.jsonl:1: row 0 scored 99 tokens, the data gives 1" in capsys.readouterr().err


@pytest.mark.slow
def test_train_on_a_mesh_saves_and_a_rerun_resumes(word_ckpt, text_data, tmp_path, capsys):
    common = ["train", "--ckpt", str(word_ckpt), "--data", str(text_data), "--out", str(tmp_path / "run"),
              "--seq-len", "16", "--batch", "8", "--lr", "1e-3", "--save-every", "2", "--mesh", "fsdp=2,expert=4"]
    metrics = tmp_path / "run" / "metrics.jsonl"
    cli.main(common + ["--steps", "2"])
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    cli.main(common + ["--steps", "3"])
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    assert train.Checkpoints(tmp_path / "run").latest_step() == 3


def _same_results(got: Path, want: Path) -> None:
    a, b = ([json.loads(line) for line in p.read_text().splitlines()] for p in (got, want))
    assert [r["row"] for r in a] == [r["row"] for r in b] == list(range(len(b)))
    for x, y in zip(a, b):
        assert x["tokens"] == y["tokens"] and x.keys() == y.keys()
        np.testing.assert_allclose(x["loglikelihood"], y["loglikelihood"], rtol=1e-5)


@pytest.mark.slow
def test_eval_killed_after_its_first_batch_reruns_to_the_uninterrupted_file(word_ckpt, tmp_path, capsys):
    """SIGKILL as soon as the first batch's lines are on disk (each later batch compiles a new
    width, so the run is still going); the rerun keeps those lines and scores only the rest."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"ids": list(range(3, 3 + n))}) + "\n" for n in (10, 20, 40, 70, 100, 12)))
    argv = ["eval", "--ckpt", str(word_ckpt), "--data", str(data), "--max-len", "128", "--dtype", "float32",
            "--no-quant-sim", "--batch-tokens", "256"]
    part, full = tmp_path / "part.jsonl", tmp_path / "full.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "v4jax.cli", *argv, "--out", str(part)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not (part.exists() and b"\n" in part.read_bytes()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    kept = part.read_text().splitlines(keepends=True)
    assert 1 <= len(kept) < 6
    cli.main([*argv, "--out", str(part)])
    assert json.loads(capsys.readouterr().out)["rows_scored"] == 6 - len(kept)
    assert set(kept) <= set(part.read_text().splitlines(keepends=True))  # finished rows kept as written
    cli.main([*argv, "--out", str(full)])
    capsys.readouterr()
    _same_results(part, full)


@pytest.mark.slow
def test_two_processes_write_the_single_process_results_file(word_ckpt, tmp_path, capsys):
    """2 processes x 4 CPU devices (jax.distributed, data=2 spans the processes): each scores its
    half of every batch, process 0 writes the one results file, equal to one process's."""
    from test_multihost import MESH, free_port, launch

    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in WORDS))
    argv = ["eval", "--ckpt", str(word_ckpt), "--data", str(data), "--max-len", "32", "--dtype", "float32",
            "--no-quant-sim"]
    launch(free_port(), [*argv, "--out", str(tmp_path / "two.jsonl"), "--mesh", MESH])
    cli.main([*argv, "--out", str(tmp_path / "one.jsonl")])
    capsys.readouterr()
    _same_results(tmp_path / "two.jsonl", tmp_path / "one.jsonl")
