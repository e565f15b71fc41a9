"""Bad input is refused before any engine is opened (issue 14, fault 5): a token the tokenizer has
and the model has no embedding row for is named by data file, example and id, not by batch index."""
import json
import shutil

import pytest
from transformers import AutoTokenizer

import stages.teacher.stage_one as stage_one
from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher, teacher_job
from stages.teacher.scale_out.parts import WorkerSpec
from stages.teacher.scale_out.workers import run_worker
from storage_schemas.fingerprints import model_vocab_size

ADDED = "<|tool_call|>"
BAD_ROW = 30  # of 40; with 4 rows per shard, shards 0-6 would be written before it is reached


@pytest.fixture(scope="module")
def added_token_model(tiny_model_dir, tmp_path_factory):
    """The tiny model with one token added to its tokenizer only: len(tokenizer) = vocab_size + 1."""
    out = tmp_path_factory.mktemp("added-token") / "model"
    shutil.copytree(tiny_model_dir, out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.add_tokens([ADDED])
    tokenizer.save_pretrained(out)
    assert len(AutoTokenizer.from_pretrained(out)) == model_vocab_size(out) + 1
    return out


@pytest.fixture(scope="module")
def data_with_added_token(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [f"row {i}: the quick brown fox" + (f" calls {ADDED} here" if i == BAD_ROW else "") for i in range(40)]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in rows))
    return path


@pytest.fixture
def no_engine(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("engine opened")

    monkeypatch.setattr(stage_one, "open_engine", refuse)  # every path opens its engine through this name


def _config(model, data, cache_dir):
    return load_config(None, [f"model={model}", f"data.path={data}", f"cache.dir={cache_dir}", "cache.engine=hf",
                              "cache.k=8", "cache.rows_per_shard=4", "data.max_length=48"])


def _check_message(message: str, model, data) -> None:
    vocab = model_vocab_size(model)
    assert str(data) in message and f"example {BAD_ROW} " in message, message
    assert f"token id {vocab}," in message and f"[0, {vocab})" in message, message
    assert "1 added token(s) beyond the model's" in message and ADDED in message and "resize" in message, message


def test_token_without_embedding_row_is_refused_before_any_engine(added_token_model, data_with_added_token, tmp_path, no_engine):
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError) as err:
        run_cache_teacher(_config(added_token_model, data_with_added_token, cache_dir))
    _check_message(str(err.value), added_token_model, data_with_added_token)
    assert not list(cache_dir.glob("shard-*")) and not (cache_dir / "manifest.json").exists()


def test_a_scale_out_worker_refuses_it_the_same_way(added_token_model, data_with_added_token, tmp_path, no_engine):
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError) as err:
        run_worker(teacher_job(_config(added_token_model, data_with_added_token, cache_dir)), WorkerSpec(1, 2))
    _check_message(str(err.value), added_token_model, data_with_added_token)
    assert not list(cache_dir.glob("**/shard-*")) and not (cache_dir / "parts").exists()
