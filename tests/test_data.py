"""JSON Lines records to token ids: texts that start a sequence get the tokenizer's BOS,
continuations do not; every bad record is a DataError naming file:line and the field."""

import json

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


def test_packing_refuses_bad_lengths_and_too_little_data_when_called_not_at_the_first_batch():
    from v4jax import train

    for seq_len, batch in ((0, 2), (1, 2), (4, 0)):
        with pytest.raises(ValueError, match=f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch}"):
            train.packed_batches([[1, 2, 3]], seq_len=seq_len, batch_size=batch)
    with pytest.raises(DataError, match=r"data has 4 tokens \(with an EOS after each document\): fewer than one "
                                        r"batch of 2 x 4$"):
        train.packed_batches([[1, 2, 3]], seq_len=4, batch_size=2)
    with pytest.raises(DataError, match="data has 0 tokens"):
        train.packed_batches([[], []], seq_len=4, batch_size=1)
    ids, _ = next(train.packed_batches([[1, 2, 3]], seq_len=2, batch_size=2, eos_id=7))
    assert sorted(ids.reshape(-1).tolist()) == [1, 2, 3, 7]
