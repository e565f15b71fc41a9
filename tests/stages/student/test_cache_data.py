"""Train refuses data the cache does not hold (issue 24): data.* is compared with the manifest like the
model is, naming the field; the run's config.yaml records the data the cache holds."""
import shutil

import pytest

from pipeline.config import load_config
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher
from storage_schemas import FingerprintMismatch


@pytest.fixture(scope="module")
def small_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    cache = tmp_path_factory.mktemp("data-check") / "cache"
    run_cache_teacher(load_config(None, [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", f"cache.dir={cache}",
                                         "cache.engine=hf", "cache.k=8", "data.max_length=48"]))
    return cache


def train_with(tiny_model_dir, data, cache, out, *extra):
    return run_train(load_config(None, [f"model={tiny_model_dir}", f"data.path={data}", f"cache.dir={cache}",
                                        "data.max_length=48", f"train.output_dir={out}", "train.max_steps=1",
                                        "train.batch_size=4", *extra]))


@pytest.mark.parametrize("change, named", [
    ("other-file", r"data.path '.*other\.jsonl': its files are not the data the cache was made from"),
    ("data.max_length=64", r"data.max_length: this config has 64, the cache was made with 48"),
    ("data.text_field=body", r"data.text_field: this config has 'body', the cache was made with 'text'"),
    ("data.max_examples=20", r"data.max_examples: this config has 20, the cache was made from 30 examples"),
    ("data.format=chat", r"data.format: this config has 'chat', the cache was made with 'text'"),
])
def test_training_on_data_the_cache_does_not_hold_is_refused(change, named, tiny_model_dir, tiny_jsonl, small_cache, tmp_path):
    data = tiny_jsonl
    extra = [] if change == "other-file" else [change]
    if change == "other-file":
        data = tmp_path / "other.jsonl"
        data.write_text(tiny_jsonl.read_text().replace("def add", "def sub"))
    with pytest.raises(FingerprintMismatch, match=f"the cache does not hold the data this config names:\\n  {named}"):
        train_with(tiny_model_dir, data, small_cache, tmp_path / "run", *extra)
    assert not (tmp_path / "run" / "adapter").exists()


def test_a_moved_data_file_is_the_same_data_and_config_yaml_records_it(tiny_model_dir, tiny_jsonl, small_cache, tmp_path):
    moved = tmp_path / "elsewhere" / tiny_jsonl.name  # same bytes and name, another folder (the digest: stage one's)
    moved.parent.mkdir()
    shutil.copy(tiny_jsonl, moved)
    train_with(tiny_model_dir, moved, small_cache, tmp_path / "run")
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert saved.startswith("# The data this run trained on is the cache's (manifest.json dataset), not re-read from data.path:")
    assert f"#   source {tiny_jsonl.resolve()} (split train)" in saved and "format text, column(s) text, input rules 2" in saved
