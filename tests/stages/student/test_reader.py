"""open_cache refuses what does not belong to the student; load_cache_dataset reads every value back."""
import dataclasses
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.student.reader import load_cache_dataset, open_cache
from storage_schemas import FingerprintMismatch, Manifest, shard_file_name


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_open_cache_accepts_its_own_model(tiny_cache, tiny_model_dir):
    manifest = open_cache(tiny_cache, tiny_model_dir)
    assert manifest.complete and manifest.num_rows == 30 and len(manifest.shards) == 4


def test_rows_round_trip_every_value(tiny_cache, tiny_model_dir):
    manifest = open_cache(tiny_cache, tiny_model_dir, verify=False)
    dataset = load_cache_dataset(tiny_cache, manifest)
    expected = [r for s in manifest.shards for r in pq.read_table(tiny_cache / s.file).to_pylist()]
    assert len(dataset) == len(expected) == 30
    for i in (0, 7, 8, 29):  # first/last rows of shards
        row = dataset[i]
        # datasets' numpy format widens ints to int64 and floats to float32 (what the collator wants)
        assert isinstance(row["input_ids"], np.ndarray) and row["input_ids"].dtype == np.int64
        assert row["topk_logprobs"].dtype == np.float32 and row["loss_mask"].dtype == bool
        for name, value in expected[i].items():
            np.testing.assert_array_equal(row[name], np.asarray(value))


def test_streaming_gives_the_same_rows_in_order(tiny_cache, tiny_model_dir):
    manifest = open_cache(tiny_cache, tiny_model_dir, verify=False)
    mapped = load_cache_dataset(tiny_cache, manifest)
    streamed = list(load_cache_dataset(tiny_cache, manifest, streaming=True))
    assert [int(r["example_id"]) for r in streamed] == list(range(30))
    np.testing.assert_array_equal(streamed[12]["topk_ids"], mapped[12]["topk_ids"])


def test_reads_only_manifest_shards_and_selected_columns(cache_copy, tiny_model_dir):
    shutil.copy(cache_copy / shard_file_name(0), cache_copy / shard_file_name(99))  # a stray shard
    manifest = open_cache(cache_copy, tiny_model_dir)
    dataset = load_cache_dataset(cache_copy, manifest, columns=["input_ids", "loss_mask"])
    assert len(dataset) == 30 and set(dataset.column_names) == {"input_ids", "loss_mask"}


def test_reading_never_writes_into_the_cache(tiny_cache, tiny_model_dir, snapshot):
    before = snapshot(tiny_cache)
    manifest = open_cache(tiny_cache, tiny_model_dir)
    load_cache_dataset(tiny_cache, manifest)[3]
    next(iter(load_cache_dataset(tiny_cache, manifest, streaming=True)))
    assert snapshot(tiny_cache) == before


# --- refusals -----------------------------------------------------------------------------------
def test_other_tokenizer_is_refused_naming_the_field(tiny_cache, model_copy):
    config = json.loads((model_copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77  # any change to the tokenizer files changes its fingerprint
    (model_copy / "tokenizer_config.json").write_text(json.dumps(config))
    cached = Manifest.load(tiny_cache).tokenizer.sha256
    with pytest.raises(FingerprintMismatch, match="tokenizer.sha256") as err:
        open_cache(tiny_cache, model_copy, allow_model_mismatch=True)  # never relaxed for tokenizers
    assert cached in str(err.value)


def test_other_vocab_size_is_refused_with_both_values(tiny_cache, model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    vocab = config["vocab_size"]
    config["vocab_size"] = vocab + 8
    (model_copy / "config.json").write_text(json.dumps(config))
    expected = rf"tokenizer.vocab_size: cache has {vocab}, student base model has {vocab + 8}"
    with pytest.raises(FingerprintMismatch, match=expected):
        open_cache(tiny_cache, model_copy)


def test_other_teacher_weights_are_refused_unless_allowed(tiny_cache, tiny_model_dir, tmp_path):
    manifest = Manifest.load(tiny_cache)
    shutil.copytree(tiny_cache, tmp_path / "c")
    dataclasses.replace(manifest, teacher=dataclasses.replace(manifest.teacher, weights_sha256="f" * 64)).save(tmp_path / "c")
    with pytest.raises(FingerprintMismatch, match=r"(?s)teacher.weights_sha256.*allow_model_mismatch"):
        open_cache(tmp_path / "c", tiny_model_dir)
    with pytest.warns(UserWarning, match="teacher.weights_sha256"):
        open_cache(tmp_path / "c", tiny_model_dir, allow_model_mismatch=True, verify=False)


def test_missing_shard_is_named(cache_copy, tiny_model_dir):
    (cache_copy / shard_file_name(2)).unlink()
    with pytest.raises(ValueError, match=r"shard-00002.parquet: listed in the manifest but missing"):
        open_cache(cache_copy, tiny_model_dir)


def test_corrupt_shard_is_named(cache_copy, tiny_model_dir):
    path = cache_copy / shard_file_name(1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard-00001.parquet: sha256 mismatch \(corrupt\)"):
        open_cache(cache_copy, tiny_model_dir)


def test_incomplete_cache_is_refused(cache_copy, tiny_model_dir):
    manifest = Manifest.load(cache_copy)
    manifest.complete = False
    manifest.save(cache_copy)
    with pytest.raises(ValueError, match="incomplete"):
        open_cache(cache_copy, tiny_model_dir)


def test_unknown_column_is_refused(tiny_cache, tiny_model_dir):
    with pytest.raises(ValueError, match="unknown cache columns"):
        load_cache_dataset(tiny_cache, Manifest.load(tiny_cache), columns=["input_ids", "teacher_logits"])


# --- encodings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["topk_idd_rel4q112", "topk_idd_logq7", "topk_idd_f16", "topk_idd_sqrtp10", "topk_f16"])
def test_encoded_cache_collates_to_the_float32_teacher_within_its_promise(encoding, tiny_cache, tiny_model_dir,
                                                                        tiny_token_ids, build_cache, tmp_path):
    from codec_promises import promise_violations

    from stages.student.collator import CacheCollator
    from storage_schemas import get_encoding

    encoded = tmp_path / encoding
    build_cache(tiny_model_dir, tiny_token_ids, encoded, k=8, encoding=encoding)
    batches = []
    for cache in (tiny_cache, encoded):
        manifest = open_cache(cache, tiny_model_dir)  # verifies checksums and the shards' declared encoding
        dataset = load_cache_dataset(cache, manifest)
        collate = CacheCollator(pad_id=0, k=8, encoding=manifest.settings.encoding)
        batches.append(collate([dataset[i] for i in range(12)]))
    exact, got = batches
    for name in ("input_ids", "labels", "attention_mask"):
        assert exact[name].equal(got[name])
    # same cached set per position; each log-prob, the target and the mass within the promise of
    # docs/design.md §8 (tests/codec_promises.py)
    order_e, order_g = exact["teacher_topk_ids"].argsort(-1), got["teacher_topk_ids"].argsort(-1)
    ids_e, ids_g = exact["teacher_topk_ids"].gather(-1, order_e), got["teacher_topk_ids"].gather(-1, order_g)
    assert ids_e.equal(ids_g)
    lp_e = exact["teacher_topk_logprobs"].gather(-1, order_e).numpy()
    lp_g = got["teacher_topk_logprobs"].gather(-1, order_g).numpy()
    t_e, t_g = exact["teacher_target_logprob"].numpy(), got["teacher_target_logprob"].numpy()
    assert promise_violations(get_encoding(encoding), lp_e, t_e, lp_g, t_g) == []


def test_float_collator_refuses_an_encoded_cache(tiny_model_dir, tiny_token_ids, build_cache, tmp_path):
    from stages.student.collator import CacheCollator

    build_cache(tiny_model_dir, tiny_token_ids[:4], tmp_path / "c", k=8, encoding="topk_idd_logq7")
    dataset = load_cache_dataset(tmp_path / "c", open_cache(tmp_path / "c", tiny_model_dir))
    with pytest.raises(ValueError, match="integer codes mean another encoding"):
        CacheCollator(pad_id=0, k=8, encoding="topk_f32")([dataset[0]])  # not the cache's encoding
