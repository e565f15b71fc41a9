"""A partial cache written by an earlier stage one (checked in: tests/fixtures/partial-cache, made by
tests/fixtures/make_partial_cache.py, killed after 2 of 3 shards) resumes with today's stage one
to exactly the cache a fresh uninterrupted run writes: no duplicate, no gap, the same bytes."""
import hashlib
import shutil
from pathlib import Path

from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest

FIXTURE = Path(__file__).parents[2] / "fixtures" / "partial-cache"


def config(root: Path, cache: str):
    return load_config(None, [f"model={root / 'model'}", f"data.path={root / 'data.jsonl'}", f"cache.dir={root / cache}",
                              "cache.engine=hf", "cache.k=8", "cache.rows_per_shard=4", "data.max_length=32",
                              "cache.encoding=topk_idd_rel4q112"])  # the fixture's: the default before tail draws


def shard_hashes(cache_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(cache_dir.glob("shard-*.parquet"))}


def test_checked_in_partial_cache_resumes_to_the_uninterrupted_cache(tmp_path):
    root = tmp_path / "fixture"
    shutil.copytree(FIXTURE, root)
    before = shard_hashes(root / "cache")
    assert sorted(before) == ["shard-00000.parquet", "shard-00001.parquet"]

    summary = run_cache_teacher(config(root, "cache"))
    assert summary.shards_written_now == 1 and summary.examples == 12
    resumed = Manifest.load(root / "cache")
    assert resumed.complete and [s.index for s in resumed.shards] == [0, 1, 2]
    assert [s.first_example for s in resumed.shards] == [0, 4, 8] and resumed.num_rows == 12

    run_cache_teacher(config(root, "fresh"))
    after = shard_hashes(root / "cache")
    assert {name: after[name] for name in before} == before          # the old shards were not rewritten
    assert after == shard_hashes(root / "fresh")                      # and equal a fresh run, byte for byte
    assert resumed.token_ids_sha256 == Manifest.load(root / "fresh").token_ids_sha256
