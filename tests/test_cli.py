"""`v4jax eval` and `v4jax train` on a mesh: the same numbers as the library on one device,
and a rerun of `train` resumes from its latest checkpoint."""

import json

import numpy as np
import pytest

from v4jax import cli, evaluate, load_pretrained, train

WORDS = [" ".join(f"w{(7 * i + 3 * j) % 500}" for j in range(n)) for i, n in enumerate((40, 25, 70))]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in WORDS))
    return path


def test_eval_on_a_mesh_gives_the_single_device_perplexity(word_ckpt, text_data, capsys):
    cli.main(["eval", "--ckpt", str(word_ckpt), "--data", str(text_data), "--max-len", "32", "--batch", "4",
              "--mesh", "data=2,expert=4"])
    got = json.loads(capsys.readouterr().out)
    documents = [[int(w[1:]) for w in t.split()] for t in WORDS]  # the word-level tokenizer: "w17" -> 17
    want = evaluate.perplexity(load_pretrained(word_ckpt), documents, 32, 4)
    assert got["tokens"] == want["tokens"] == sum(len(d) - 1 for d in documents)
    # bf16 with FP8 activation quantisation: a reduction order that differs across devices may
    # flip an occasional rounding, so the mean log-likelihood agrees to bf16 round-off, not bitwise
    assert abs(np.log(got["perplexity"]) - np.log(want["perplexity"])) < 2e-3 * np.log(want["perplexity"])


@pytest.mark.slow
def test_train_on_a_mesh_saves_and_a_rerun_resumes(word_ckpt, text_data, tmp_path, capsys):
    common = ["train", "--ckpt", str(word_ckpt), "--data", str(text_data), "--out", str(tmp_path / "run"),
              "--seq-len", "16", "--batch", "8", "--lr", "1e-3", "--save-every", "2", "--mesh", "fsdp=2,expert=4"]
    cli.main(common + ["--steps", "2"])
    first = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in first] == ["step 1", "step 2"]
    cli.main(common + ["--steps", "3"])
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == ["step 3"]
    assert train.Checkpoints(tmp_path / "run").latest_step() == 3
