"""JSON Lines records to token ids: texts that start a sequence get the tokenizer's BOS,
continuations do not; every bad record is a DataError naming file:line and the field."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from v4jax import data
from v4jax.errors import DataError

BOS = 0


@pytest.fixture
def tokenizer():
    tok = Tokenizer(models.WordLevel({"<bos>": BOS, "a": 1, "b": 2, "c": 3}, unk_token="<bos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return tok


def write(tmp_path, records):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_bytes(tmp_path, raw: bytes):
    path = tmp_path / "data.jsonl"
    path.write_bytes(raw)
    return path


def test_documents_and_contexts_start_with_bos_continuations_do_not(tokenizer, tmp_path):
    docs = write(tmp_path, [{"text": "a b"}, {"ids": [3, 3]}])
    assert data.documents(docs, tokenizer) == [[BOS, 1, 2], [3, 3]]
    assert not data.is_scoring(docs)
    pairs = write(tmp_path, [{"context": "a b", "continuation": "c"}, {"context": [1], "continuation": [2, 3]}])
    assert data.scoring_requests(pairs, tokenizer) == [([BOS, 1, 2], [3]), ([1], [2, 3])]
    assert data.is_scoring(pairs)


def test_blank_lines_are_skipped_and_lines_keep_their_file_numbers(tmp_path):
    path = write_bytes(tmp_path, b'\xef\xbb\xbf{"ids": [1]}\n\n   \n{"ids": [2, 3], "source": "x"}\n')
    assert data.documents(path) == [[1], [2, 3]]  # a BOM and extra keys are fine
    path = write_bytes(tmp_path, b'{"ids": [1]}\n\n{"ids": [2, "3"]}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3: field 'ids': token ids must be integers, got \"3\"$"):
        data.documents(path)


@pytest.mark.parametrize("raw, message", [
    (b'{"ids": [1]}\n{"ids": [1, 2\n', r"data\.jsonl:2: not JSON: "),
    (b'{"ids": [1]}\n[1, 2]\n', r"data\.jsonl:2: each line must be a JSON object, got list$"),
    (b'{"ids": [1]}\n{"text": "caf\xe9"}\n', r"data\.jsonl:2: not UTF-8 \(byte 13: b'\\xe9'\)$"),
    (b'\n  \n', r"data\.jsonl: no records \(every line is blank\)$"),
    (b'{"txt": "a"}\n', r"data\.jsonl:1: a record needs one of 'ids' or 'text', found keys \['txt'\]$"),
    (b'{"ids": [1], "text": "a"}\n', r"data\.jsonl:1: a record needs one of 'ids' or 'text', not both$"),
    (b'{"ids": []}\n', r"data\.jsonl:1: field 'ids': no tokens$"),
    (b'{"text": ""}\n', r"data\.jsonl:1: field 'text': empty text$"),
    (b'{"ids": [1, true]}\n', r"data\.jsonl:1: field 'ids': token ids must be integers, got true$"),
    (b'{"ids": [1, 2.5]}\n', r"data\.jsonl:1: field 'ids': token ids must be integers, got 2\.5$"),
    (b'{"ids": 7}\n', r"data\.jsonl:1: field 'ids': expected a list of token ids or a string, got 7$"),
    (b'{"ids": [1, 600]}\n', r"data\.jsonl:1: field 'ids': token id 600 \(position 1\) is outside the "
                             r"vocabulary \[0, 512\)$"),
    (b'{"ids": [-1]}\n', r"data\.jsonl:1: field 'ids': token id -1 \(position 0\) is outside"),
    (b'{"ids": [1, 100000000000000000000000]}\n', r"token id 100000000000000000000000 \(position 1\) is outside"),
])
def test_bad_documents_name_file_line_and_field(tokenizer, tmp_path, raw, message):
    with pytest.raises(DataError, match=message):
        data.documents(write_bytes(tmp_path, raw), tokenizer, vocab_size=512)


def test_bad_scoring_records_name_file_line_and_field(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'continuation': expected a list of token ids or a "
                                        r"string, got 5$"):
        data.scoring_requests(write(tmp_path, [{"context": "a", "continuation": 5}]), tokenizer)
    with pytest.raises(DataError, match=r"data\.jsonl:2: a scoring record needs 'context' and 'continuation' "
                                        r"\(missing 'continuation'\)$"):
        data.scoring_requests(write(tmp_path, [{"context": [1], "continuation": [2]}, {"context": [1]}]))
    with pytest.raises(DataError, match=r"data\.jsonl:1: context \+ continuation are 5 tokens; the model takes "
                                        r"at most 4$"):
        data.scoring_requests(write(tmp_path, [{"context": [1, 2, 3], "continuation": [2, 3]}]), max_len=4)
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'context': token id 9 \(position 0\)"):
        data.scoring_requests(write(tmp_path, [{"context": [9], "continuation": [2]}]), vocab_size=4)


def test_text_without_a_tokenizer_and_a_broken_tokenizer_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data\.jsonl:1: field 'text': text needs the checkpoint's tokenizer\.json"):
        data.documents(write(tmp_path, [{"text": "a"}]))
    assert data.load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer\.json: not a tokenizers file: "):
        data.load_tokenizer(tmp_path)


def test_training_examples_append_eos_and_mask_the_prompt(tokenizer, tmp_path):
    path = write(tmp_path, [{"text": "a b"}, {"ids": [3, 3]}, {"prompt": "a", "completion": "b c"},
                            {"prompt": [2], "completion": [3]}])
    assert data.training_examples(path, tokenizer, eos_id=9) == [
        ([BOS, 1, 2, 9], [1, 1, 1, 1]), ([3, 3, 9], [1, 1, 1]), ([BOS, 1, 2, 3, 9], [0, 0, 1, 1, 1]),
        ([2, 3, 9], [0, 1, 1])]
    assert data.training_examples(path, tokenizer, eos_id=None)[2] == ([BOS, 1, 2, 3], [0, 0, 1, 1])
    for record, message in (({"prompt": "a"}, r"data\.jsonl:1: a 'prompt' record needs a 'completion'$"),
                            ({"text": "a", "ids": [1]}, r"data\.jsonl:1: a record needs one of 'ids', 'text' or "
                                                        r"'prompt' \+ 'completion', not 'ids' and 'text'$"),
                            ({"completion": "a"}, r"data\.jsonl:1: a record needs one of .* found keys "
                                                  r"\['completion'\]$"),
                            ({"prompt": "a", "completion": []}, r"data\.jsonl:1: field 'completion': no tokens$")):
        with pytest.raises(DataError, match=message):
            data.training_examples(write(tmp_path, [record]), tokenizer, eos_id=9)


def test_pack_rows_starts_documents_at_multiples_of_128_and_splits_long_ones():
    lengths = [130, 5, 300, 60, 60]
    examples = [(list(range(10 * i + 1, 10 * i + 1 + n)), [i % 2] * n) for i, n in enumerate(lengths)]
    rows = data.pack_rows(examples, seq_len=256)
    # By hand: 130 -> row 0 (padded to 256); 5 -> row 1 at 0; 300 -> 256 (row 2) + 44 (row 3 at 0, as
    # row 1 was closed); 60 -> row 3 at 128; 60 -> row 4 at 0.
    want = {0: [(0, 0, 130)], 1: [(1, 0, 5)], 2: [(2, 0, 256)], 3: [(2, 256, 44), (3, 0, 60)], 4: [(4, 0, 60)]}
    assert rows["input_ids"].shape == (5, 256) and all(v.dtype == np.int32 for v in rows.values())
    for r, pieces in want.items():
        seg, pos, ids, mask = (rows[k][r] for k in ("segment_ids", "positions", "input_ids", "loss_mask"))
        expect_seg = np.zeros(256, int)
        for s, (doc, offset, n) in enumerate(pieces, 1):
            start = 128 * (s - 1) if r == 3 else 0
            np.testing.assert_array_equal(ids[start:start + n], examples[doc][0][offset:offset + n])
            np.testing.assert_array_equal(pos[start:start + n], np.arange(n))
            np.testing.assert_array_equal(mask[start:start + n], doc % 2)
            expect_seg[start:start + n] = s
        np.testing.assert_array_equal(seg, expect_seg)
        assert not mask[seg == 0].any() and not pos[seg == 0].any()
    short = data.pack_rows([([1, 2, 3], [1, 1, 1])] * 3, seq_len=16)  # below 128: one piece per row
    assert short["segment_ids"].tolist() == [[1] * 3 + [0] * 13] * 3
    with pytest.raises(ValueError, match="seq_len 200 must be a multiple of 128"):
        data.pack_rows(examples, seq_len=200)


def test_training_batches_resume_from_a_saved_position_and_cover_every_row_each_epoch():
    rows = data.pack_rows([([i + 1] * 3, [1] * 3) for i in range(6)], seq_len=4)
    it = data.training_batches(rows, batch_size=2, seed=5)
    got = [next(it) for _ in range(6)]
    assert sorted(b["input_ids"][:, 0].tolist() for b in got[:3]) != [[1, 2], [3, 4], [5, 6]]  # shuffled
    for epoch in (got[:3], got[3:]):
        assert sorted(int(x) for b in epoch for x in b["input_ids"][:, 0]) == [1, 2, 3, 4, 5, 6]
    assert [b["input_ids"][:, 0].tolist() for b in got[:3]] != [b["input_ids"][:, 0].tolist() for b in got[3:]]
    again = data.training_batches(rows, batch_size=2, seed=5)
    for _ in range(2):
        next(again)
    state = json.loads(json.dumps(again.get_state()))  # saved as JSON with a checkpoint
    resumed = data.training_batches(rows, batch_size=2, seed=5)
    resumed.set_state(state)
    for want in got[2:]:
        batch = next(resumed)
        assert batch.keys() == want.keys() and all(np.array_equal(batch[k], want[k]) for k in want)
    with pytest.raises(DataError, match=r"data packs into 6 rows of 4 tokens: fewer than one batch of 7$"):
        data.training_batches(rows, batch_size=7)


def test_training_batches_of_one_row_run_past_an_epoch():
    rows = data.pack_rows([([i + 1] * 3, [1] * 3) for i in range(3)], seq_len=4)
    it = data.training_batches(rows, batch_size=1, seed=0)  # Grain's endless repeat overflowed len() here
    got = [int(next(it)["input_ids"][0, 0]) for _ in range(6)]
    assert sorted(got[:3]) == sorted(got[3:]) == [1, 2, 3]
