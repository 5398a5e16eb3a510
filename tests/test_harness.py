"""The lm-evaluation-harness model `v4jax`: `v4jax lm-eval` runs local tasks end to end (a task
YAML over JSON data and a word-level tokenizer with a BOS, all written here; no hub), and every
sample's result equals v4jax's own scorer or Generator on the tokens HFLM would give them."""

import glob
import json
import os
import shutil

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")

from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from v4jax import cli, evaluate, load_pretrained  # noqa: E402
from v4jax.generate import Generator  # noqa: E402
from v4jax.sampling import Sampling  # noqa: E402

MAX_LENGTH = 16
BOS, EOS = 0, 1  # configs/tiny.json
CONTEXTS = ["w5 w7 w9", " ".join(f"w{10 + i}" for i in range(30)), "w300 w301 "]
CONTINUATIONS = [" w11", " w2", "w40"]  # the third after a context ending in a space
TEXTS = ["w8 w9 w10", " ".join(f"w{(13 * i) % 500}" for i in range(40))]
TASKS = {
    "tiny_ll": ("loglikelihood", "ll.jsonl", {"doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
                                              "metric_list": [{"metric": "acc"}]}),
    "tiny_rolling": ("loglikelihood_rolling", "docs.jsonl", {"doc_to_text": "", "doc_to_target": "{{text}}",
                                                             "metric_list": [{"metric": "word_perplexity"}]}),
    "tiny_greedy": ("generate_until", "gen.jsonl", {"doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
                                                    "generation_kwargs": {"until": ["w3"], "max_gen_toks": 6,
                                                                          "do_sample": False},
                                                    "metric_list": [{"metric": "exact_match"}]}),
    "tiny_sampled": ("generate_until", "gen.jsonl", {"doc_to_text": "{{context}}", "doc_to_target": "{{target}}",
                                                     "generation_kwargs": {"until": ["w3"], "max_gen_toks": 6,
                                                                           "do_sample": True, "temperature": 1.0},
                                                     "metric_list": [{"metric": "exact_match"}]}),
}


@pytest.fixture(scope="module")
def bos_ckpt(word_ckpt, tmp_path_factory):
    """The word-level checkpoint whose tokenizer adds BOS (as DeepSeek's does): "w5 w7" -> [0, 5, 7]."""
    from tokenizers import Tokenizer, processors

    path = tmp_path_factory.mktemp("ckpt") / "bos"
    shutil.copytree(word_ckpt, path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single="w0 $A", special_tokens=[("w0", BOS)])
    tok.save(str(path / "tokenizer.json"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "bos_token_id": BOS, "eos_token_id": EOS}))
    return path


def ids(text):
    return [int(w[1:]) for w in text.split()]


def write_tasks(folder):
    rows = {"ll.jsonl": [{"context": c, "continuation": k} for c, k in zip(CONTEXTS, CONTINUATIONS)],
            "docs.jsonl": [{"text": t} for t in TEXTS],
            "gen.jsonl": [{"context": c, "target": "w1"} for c in CONTEXTS[:2]]}
    for name, records in rows.items():
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in records))
    for task, (kind, data, fields) in TASKS.items():
        spec = {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(folder / data)}},
                "test_split": "test", "output_type": kind, **fields}
        (folder / f"{task}.yaml").write_text(json.dumps(spec))  # JSON is YAML


@pytest.mark.slow  # lm-eval and datasets import, four tasks, scoring and generation compiles: ~90 s of CPU
def test_lm_eval_tasks_give_v4jax_scores_on_hflm_tokens(bos_ckpt, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_tasks(tasks)
    cli.main(["lm-eval", "--ckpt", str(bos_ckpt), "--dtype", "float32", "--no-quant-sim", "--max-length",
              str(MAX_LENGTH), "--tasks", ",".join(TASKS), "--include_path", str(tasks), "--log_samples",
              "--output_path", str(tmp_path / "out"), "--seed", "0"])
    samples = {}
    for task in TASKS:
        (path,) = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
        samples[task] = sorted((json.loads(line) for line in open(path)), key=lambda s: s["doc_id"])
    assert glob.glob(str(tmp_path / "out" / "**" / "results_*.json"), recursive=True)

    model = load_pretrained(bos_ckpt, dtype="float32", quant_sim=False)
    # HFLM: the context's tokens (with BOS), the continuation's after a space, the oldest context
    # tokens dropped so at most MAX_LENGTH inputs remain
    pairs = []
    for c, k in zip(CONTEXTS, CONTINUATIONS):
        whole = [BOS, *ids(c), *ids(k)]
        seq = whole[-(MAX_LENGTH + 1):]
        pairs.append((seq[:len(seq) - len(ids(k))], ids(k)))
    want = evaluate.loglikelihood(model, pairs)
    for s, w in zip(samples["tiny_ll"], want, strict=True):
        ll, greedy = s["resps"][0][0]  # lm-eval logs them as strings
        np.testing.assert_allclose(float(ll), w.loglikelihood, rtol=1e-5)
        assert greedy == str(w.is_greedy)

    # HFLM's own rolling windows (lm_eval.utils), each scored as a (context, continuation) pair; a
    # text that starts with the BOS text ("w0", the second) gets no second BOS
    for s, text in zip(samples["tiny_rolling"], TEXTS, strict=True):
        tokens = ids(text) if text.startswith("w0") else [BOS, *ids(text)]
        windows = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, BOS, MAX_LENGTH, 1)]
        want = sum(x.loglikelihood for x in evaluate.loglikelihood(model, windows))
        np.testing.assert_allclose(float(s["resps"][0][0]), want, rtol=1e-5)

    # the prompt left-truncated to MAX_LENGTH - max_gen_toks; the text cut at the stop string and,
    # as HFLM does, at the EOS token's text ("w1", so "w185" cuts too)
    prompts = [[BOS, *ids(c)][-(MAX_LENGTH - 6):] for c in CONTEXTS[:2]]
    for task, sampling in (("tiny_greedy", Sampling(0.0)), ("tiny_sampled", Sampling(1.0))):
        gen = Generator(model, batch_size=2, max_len=max(map(len, prompts)) + 6)
        out = gen.generate(prompts, 6, sampling, seed=0, stop_tokens=[EOS])
        want = [" ".join(f"w{t}" for t in seq.tokens).split("w3")[0].split("w1")[0] for seq in out.sequences]
        got = [s["resps"][0][0] for s in samples[task]]
        assert got == want, task
