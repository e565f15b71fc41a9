"""Stage one on what users bring: tool-calling chats as `datasets` loads them, pre-rendered text with
its own BOS, and rows that cannot be used (refused, or skipped when asked). Expectations are written
from the rule and the data, not from the code under test."""
import json
import shutil

import pyarrow.parquet as pq
import pytest
from tiny_models import decoded_runs, tool_chat_bodies, tool_conversations
from tokenizers import processors
from transformers import AutoTokenizer

from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest


def stage_one(model_dir, data_path, cache_dir, *extra):
    overrides = [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}", "cache.engine=hf",
                 "cache.k=8", "cache.rows_per_shard=4", "data.max_length=512", *extra]
    return run_cache_teacher(load_config(None, overrides))


def cached_rows(cache_dir) -> list[dict]:
    return [r for s in Manifest.load(cache_dir).shards for r in pq.read_table(cache_dir / s.file).to_pylist()]


def trained_runs(row, tokenizer) -> list[str]:
    return decoded_runs(row["input_ids"][1:], row["loss_mask"], tokenizer)


def test_tool_call_turns_with_null_content_are_cached(tool_chat_model_dir, tool_chat_jsonl, tmp_path):
    """Issue 14 fault 3: `content: null` beside `tool_calls` (and None in every missing key) renders;
    each assistant turn's trained text is its rendered content/tool call and closing <|im_end|>."""
    stage_one(tool_chat_model_dir, tool_chat_jsonl, tmp_path / "cache", "data.messages_field=messages")
    tok = AutoTokenizer.from_pretrained(tool_chat_model_dir)
    rows = cached_rows(tmp_path / "cache")
    chats = tool_conversations(12)
    assert [r["example_id"] for r in rows] == list(range(12))
    for row, chat in zip(rows, chats):
        assert trained_runs(row, tok) == tool_chat_bodies(chat)
    assert rows[0]["example_id"] == 0 and trained_runs(rows[0], tok)[0] == (
        '<tool_call>\nget_weather {"city": "Paris"}\n</tool_call><|im_end|>')


@pytest.fixture
def bos_model_dir(tiny_model_dir, tmp_path):
    """The tiny model whose tokenizer puts <s> in front of every text, as Llama tokenizers do."""
    out = tmp_path / "bos-model"
    shutil.copytree(tiny_model_dir, out)
    tok = AutoTokenizer.from_pretrained(out)
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    tok.save_pretrained(out)
    return out


def test_text_rows_with_their_own_bos_keep_one(bos_model_dir, tmp_path):
    """Issue 14 fault 4: a pre-rendered row starting with "<s>" must not become [<s>, <s>, ...];
    special-token strings elsewhere in a row are parsed as the tokenizer parses them."""
    texts = ["<s>def add(a, b): return a + b", "for i in range(10): print(i)", "<s>The quick brown fox.</s>",
             "Lists are mutable sequences.</s><s>The lazy dog."]
    data = tmp_path / "pre-rendered.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    summary = stage_one(bos_model_dir, data, tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(bos_model_dir)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    plain = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    expected = [[bos] + plain("def add(a, b): return a + b"), [bos] + plain("for i in range(10): print(i)"),
                [bos] + plain("The quick brown fox.") + [eos],
                [bos] + plain("Lists are mutable sequences.") + [eos, bos] + plain("The lazy dog.")]
    assert [r["input_ids"] for r in cached_rows(tmp_path / "cache")] == expected
    assert summary.leading_bos_dropped == 2
    assert Manifest.load(tmp_path / "cache").dataset.leading_bos_dropped == 2
    assert "duplicated leading BOS dropped 2" in summary.render()


def test_unusable_chat_is_refused_by_file_and_example_or_skipped_as_a_gap(tool_chat_model_dir, tmp_path):
    chats = tool_conversations(6)
    chats[3] = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": None}]  # nothing to train
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    with pytest.raises(ValueError, match=r"chats\.jsonl: example 3, field 'messages': message 1: an assistant turn "
                                         r"with neither content nor tool calls"):
        stage_one(tool_chat_model_dir, data, tmp_path / "refused", "data.messages_field=messages")
    assert not list((tmp_path / "refused").glob("shard-*"))

    summary = stage_one(tool_chat_model_dir, data, tmp_path / "skipped", "data.messages_field=messages",
                        "data.on_bad_example=skip")
    manifest = Manifest.load(tmp_path / "skipped")
    assert [r["example_id"] for r in cached_rows(tmp_path / "skipped")] == [0, 1, 2, 4, 5]
    assert manifest.dataset.skipped_examples == [3] and manifest.complete and summary.skipped == 1
    assert "skipped examples 1" in summary.render()

    from pipeline.inspect_cache import describe_position

    row5 = cached_rows(tmp_path / "skipped")[-1]
    first_trained = row5["loss_mask"].index(True)  # example 5 sits after the gap, in the second shard
    shown = describe_position(str(tmp_path / "skipped"), example=5, position=first_trained)
    tok = AutoTokenizer.from_pretrained(tool_chat_model_dir)
    context = lambda row: repr(tok.decode(row["input_ids"][first_trained - 12:first_trained + 1]))  # noqa: E731
    row4 = cached_rows(tmp_path / "skipped")[-2]
    assert context(row5) in shown and context(row4) != context(row5)  # example 5's own row, not its neighbour's
    with pytest.raises(ValueError, match="example 3 was skipped"):
        describe_position(str(tmp_path / "skipped"), example=3, position=0)
