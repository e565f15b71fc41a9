"""A cache with tail draws end to end: stage one writes the same bytes however it batches, workers or a
resume (the draws are a function of seed, example id and position); stage two trains `sampled_tail` from
it, and refuses it on a cache without draws or with a cut head (train.k)."""
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from run_configs import make_config as make_train_config

from pipeline.config import load_config
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest
from storage_schemas.shard_io import decode_draw_columns, decode_table

ENCODING = "topk_idd_rel4q112_draws8"


def cache_config(model_dir, data_path, cache_dir, *extra):
    return load_config(None, [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}",
                              "cache.engine=hf", "cache.k=8", "cache.rows_per_shard=8", "data.max_length=48",
                              f"cache.encoding={ENCODING}", *extra])


@pytest.fixture(scope="module")
def drawn_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("drawn") / "c"
    run_cache_teacher(cache_config(tiny_model_dir, tiny_jsonl, cache_dir))
    return cache_dir


def shard_hashes(cache_dir: Path) -> list[str]:
    return [record.sha256 for record in Manifest.load(cache_dir).shards]


def test_the_draws_do_not_depend_on_batching(drawn_cache, tiny_model_dir, tiny_jsonl, tmp_path):
    # 48 tokens per forward (one sequence at a time) against the default 32k (the whole data in one batch)
    other = tmp_path / "one_at_a_time"
    run_cache_teacher(cache_config(tiny_model_dir, tiny_jsonl, other, "cache.batch_tokens=48"))
    assert shard_hashes(other) == shard_hashes(drawn_cache)


def test_the_columns_hold_draws_outside_the_head(drawn_cache):
    table = pq.read_table(drawn_cache / Manifest.load(drawn_cache).shards[0].file)
    ids, _, _ = decode_table(table, ENCODING, 8)
    draws, entropy = decode_draw_columns(table, ENCODING)
    assert draws.shape == (ids.shape[0], 8) and np.all(np.diff(draws, axis=1) >= 0)
    assert not (draws[:, :, None] == ids[:, None, :]).any()
    assert np.all(np.isfinite(entropy)) and np.all(entropy > 0)


def test_sampled_tail_trains_from_it(drawn_cache, tiny_model_dir, tmp_path):
    metrics = run_train(make_train_config(tiny_model_dir, drawn_cache, tmp_path / "run", method="sampled_tail",
                                          max_steps=2, save_steps=2, reg_weight=1.0))
    assert math.isfinite(metrics["final_kl"]) and metrics["fused_loss"] is True


def test_settings_that_cannot_draw_are_refused_when_the_config_loads(tiny_model_dir, tiny_jsonl, tmp_path):
    with pytest.raises(ValueError, match="cache.vllm_output='prompt_logprobs' cannot make tail draws"):
        cache_config(tiny_model_dir, tiny_jsonl, tmp_path / "c", "cache.engine=vllm", "cache.vllm_output=prompt_logprobs")
    with pytest.raises(ValueError, match="cache.encoding: unknown value encoding 'topk_idd_rel4q112_draws7'"):
        cache_config(tiny_model_dir, tiny_jsonl, tmp_path / "c", "cache.encoding=topk_idd_rel4q112_draws7")
    assert not (tmp_path / "c").exists()


def test_sampled_tail_is_refused_without_draws_or_with_a_cut_head(drawn_cache, tiny_cache, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reads the teacher's tail draws, but this cache's encoding 'topk_f32' has none"):
        run_train(make_train_config(tiny_model_dir, tiny_cache, tmp_path / "a", method="sampled_tail", max_steps=1))
    with pytest.raises(ValueError, match="train.k=4 with train.method='sampled_tail'"):
        run_train(make_train_config(tiny_model_dir, drawn_cache, tmp_path / "b", method="sampled_tail", max_steps=1, k=4))


def test_inspect_shows_a_positions_draws(drawn_cache, tiny_model_dir):
    from pipeline.inspect_cache import describe_position

    text = describe_position(str(drawn_cache), 0, 3, model_dir=str(tiny_model_dir))
    assert "8 draws from the tail (entropy H_T = " in text


def test_the_defaults_write_draws_and_train_sampled_tail_from_them(tiny_model_dir, tiny_jsonl, tmp_path):
    """Issue 27's switch: a config that names no k, encoding or method writes k = 16 + 16 tail draws and trains
    `sampled_tail` from them; a cache without draws is still trained, but only by a method that reads it."""
    from stages.student.settings import TrainConfig
    from stages.teacher.settings import CacheConfig

    assert (CacheConfig().k, CacheConfig().encoding, TrainConfig().method) == (16, "topk_idd_rel4q112_draws16", "sampled_tail")
    common = [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "cache.engine=hf", "data.max_length=48",
              "train.max_steps=2", "train.save_steps=2", "train.batch_size=4"]
    config = load_config(None, [*common, f"cache.dir={tmp_path / 'default'}", f"train.output_dir={tmp_path / 'run'}"])
    run_cache_teacher(config)
    settings = Manifest.load(tmp_path / "default").settings
    assert (settings.k, settings.encoding) == (16, "topk_idd_rel4q112_draws16")
    assert math.isfinite(run_train(config)["final_kl"])
    old = load_config(None, [*common, f"cache.dir={tmp_path / 'old'}", "cache.k=32", "cache.encoding=topk_idd_rel4q112",
                             f"train.output_dir={tmp_path / 'old-run'}"])
    run_cache_teacher(old)
    with pytest.raises(ValueError, match=r"has none .*\(train\.method=tail"):
        run_train(old)
    assert math.isfinite(run_train(load_config(None, [*common, f"cache.dir={tmp_path / 'old'}", "train.method=tail",
                                                      f"train.output_dir={tmp_path / 'old-run'}"]))["final_kl"])


def test_a_head_of_every_non_target_token_leaves_nothing_to_draw_and_is_refused(tiny_model_dir, tiny_jsonl, tmp_path):
    from storage_schemas.fingerprints import model_vocab_size

    vocab = model_vocab_size(tiny_model_dir)
    with pytest.raises(ValueError, match=rf"cache.k={vocab - 1} = vocab_size - 1 .* no tail is left .*cache.k <= {vocab - 2}"):
        run_cache_teacher(cache_config(tiny_model_dir, tiny_jsonl, tmp_path / "c", f"cache.k={vocab - 1}"))
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("shard-*"))
    run_cache_teacher(cache_config(tiny_model_dir, tiny_jsonl, tmp_path / "ok", f"cache.k={vocab - 2}", "data.max_examples=4"))
