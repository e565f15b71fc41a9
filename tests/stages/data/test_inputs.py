"""Input data: the formats a user supplies, tokenization, masks, and bad input named clearly."""
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from stages.data.inputs import DataConfig, load_rows, tokenize_rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def examples(path, tokenizer, **kw):
    cfg = DataConfig(path=str(path), **kw)
    return tokenize_rows(load_rows(cfg), tokenizer, cfg)


def test_text_rows_train_every_position(tmp_path, tokenizer):
    [ex] = examples(write_jsonl(tmp_path / "a.jsonl", [{"text": "def add(a, b): return a + b"}]), tokenizer)
    assert ex.input_ids.dtype == np.int32 and len(ex.loss_mask) == len(ex.input_ids) - 1 and ex.loss_mask.all()


def test_parquet_and_csv_sources_read_the_same(tmp_path, tokenizer):
    import datasets

    ds = datasets.Dataset.from_list([{"text": "hello world"}, {"text": "for i in range(3): print(i)"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    got = [[e.input_ids.tolist() for e in examples(p, tokenizer)] for p in (tmp_path / "d.parquet", tmp_path / "d.csv", tmp_path / "saved")]
    assert got[0] == got[1] == got[2]


def test_chat_rows_train_only_assistant_tokens(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "add two numbers"}, {"role": "assistant", "content": "return a + b"}]
    [ex] = examples(write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}]), tokenizer, messages_field="messages")
    trained = tokenizer.decode(ex.input_ids[1:][ex.loss_mask])
    assert "return a + b" in trained and "add two numbers" not in trained
    assert not ex.loss_mask[0]


def test_long_sequences_are_truncated_and_counted(tmp_path, tokenizer):
    rows = [{"text": "word " * 200}, {"text": "short"}]
    out = examples(write_jsonl(tmp_path / "l.jsonl", rows), tokenizer, max_length=16)
    assert [len(e.input_ids) for e in out][0] == 16 and [e.truncated for e in out] == [True, False]


@pytest.mark.parametrize("text", ["", "   \n\t "])
def test_empty_text_names_the_example(tmp_path, tokenizer, text):
    path = write_jsonl(tmp_path / "e.jsonl", [{"text": "fine"}, {"text": text}])
    with pytest.raises(ValueError, match=r"e\.jsonl: example 1, field 'text': empty"):
        examples(path, tokenizer)


def test_missing_field_is_named(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"m\.jsonl: no column of a supported input format \(columns: \['body'\]\); supported "
                                         r"formats and the keys that select them: text \(a string column data\.text_field='text'"):
        examples(write_jsonl(tmp_path / "m.jsonl", [{"body": "x"}]), tokenizer)


def test_non_utf8_bytes_name_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9 \xff"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2 is not valid UTF-8"):
        examples(path, tokenizer)


def test_missing_path_is_named(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        examples(tmp_path / "nowhere.jsonl", tokenizer)
