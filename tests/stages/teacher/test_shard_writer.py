"""The background shard writer: shards and manifest as the synchronous path wrote them, and a
writer error surfaces in the main thread without a manifest entry for the failed shard."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.teacher.shard_writer import ShardWriter
from storage_schemas import (
    CacheSettings,
    DatasetFingerprint,
    EngineInfo,
    Manifest,
    TeacherFingerprint,
    TokenizerFingerprint,
)
from storage_schemas.shard_io import ShardRow, rows_to_table, verify_cache

K = 3


def row(example_id: int, length: int, k: int = K) -> ShardRow:
    rng = np.random.default_rng(example_id)
    n = length - 1
    return ShardRow(example_id=example_id, input_ids=rng.integers(0, 50, length).astype(np.int32),
                    loss_mask=np.ones(n, bool), target_logprob=-rng.random(n).astype(np.float32),
                    topk_ids=rng.integers(0, 50, (n, k)).astype(np.int32),
                    topk_logprobs=-rng.random((n, k)).astype(np.float32))


def new_manifest(num_examples: int) -> Manifest:
    return Manifest(
        teacher=TeacherFingerprint("m", None, "w" * 64, "c" * 64), tokenizer=TokenizerFingerprint("t" * 64, 50),
        dataset=DatasetFingerprint(source="d", split="train", field="text", format="text", source_sha256="s" * 64,
                                   num_examples=num_examples),
        settings=CacheSettings(k=K, encoding="topk_f32", max_length=16, truncation="right", rows_per_shard=2,
                               zstd_level=3),
        engine=EngineInfo(name="hf", dtype="float32", versions={}),
    )


def test_shards_and_manifest_match_the_rows(tmp_path):
    shards = [[row(0, 5), row(1, 9)], [row(2, 16), row(3, 2)], [row(4, 7)]]
    manifest = new_manifest(5)
    with ShardWriter(tmp_path, manifest, "topk_f32", K, zstd_level=3, max_pending=1) as writer:
        for index, rows in enumerate(shards):
            writer.submit(index, rows[0].example_id, rows, truncated=index)
    assert [r.index for r in manifest.shards] == [0, 1, 2] and [r.truncated for r in manifest.shards] == [0, 1, 2]
    assert writer.tokens_written == 5 + 9 + 16 + 2 + 7 == manifest.num_tokens
    on_disk = Manifest.load(tmp_path)
    assert [r.sha256 for r in on_disk.shards] == [r.sha256 for r in manifest.shards]
    for record, rows in zip(on_disk.shards, shards):
        assert pq.read_table(tmp_path / record.file).equals(rows_to_table(rows, "topk_f32", K))
    on_disk.complete = True
    assert verify_cache(tmp_path, on_disk) == []


def test_a_writer_error_is_raised_in_the_main_thread_and_not_recorded(tmp_path):
    manifest = new_manifest(4)
    bad = row(2, 6, k=K + 1)  # wrong k: rows_to_table refuses it on the writer thread
    writer = ShardWriter(tmp_path, manifest, "topk_f32", K, zstd_level=3, max_pending=1)
    writer.submit(0, 0, [row(0, 4), row(1, 4)], truncated=0)
    writer.submit(1, 2, [bad], truncated=0)
    with pytest.raises(RuntimeError, match=r"writing a cache shard .* failed: example 2: topk_ids shape"):
        for index in range(2, 50):  # a later submit (or close) raises; submit never blocks forever
            writer.submit(index, 0, [row(0, 4)], truncated=0)
        writer.close()
    with pytest.raises(RuntimeError, match="example 2"):
        writer.close()
    assert [r.index for r in Manifest.load(tmp_path).shards] == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-00000.parquet"]
