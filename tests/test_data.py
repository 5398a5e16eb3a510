"""JSON Lines records to token ids: texts that start a sequence get the tokenizer's BOS,
continuations do not; bad records name the file, record and field."""

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from v4jax import data

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


def test_documents_and_contexts_start_with_bos_continuations_do_not(tokenizer, tmp_path):
    docs = write(tmp_path, [{"text": "a b"}, {"ids": [3, 3]}])
    assert data.documents(docs, tokenizer) == [[BOS, 1, 2], [3, 3]]
    pairs = write(tmp_path, [{"context": "a b", "continuation": "c"}, {"context": [1], "continuation": [2, 3]}])
    assert data.scoring_requests(pairs, tokenizer) == [([BOS, 1, 2], [3]), ([1], [2, 3])]


def test_bad_records_name_file_record_and_field(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"data\.jsonl: record 2 has neither 'ids' nor 'text'"):
        data.documents(write(tmp_path, [{"text": "a"}, {"txt": "b"}]), tokenizer)
    with pytest.raises(ValueError, match=r"data\.jsonl: record 1 field 'continuation': expected a list"):
        data.scoring_requests(write(tmp_path, [{"context": "a", "continuation": 5}]), tokenizer)
    with pytest.raises(ValueError, match=r"record 1 field 'text': text needs the checkpoint's tokenizer\.json"):
        data.documents(write(tmp_path, [{"text": "a"}]))
