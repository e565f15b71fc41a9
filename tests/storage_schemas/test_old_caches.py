"""Caches written by the schema-version-1 code (checked-in files) still read, value for value.

`data/v1-topk_f32` and `data/v1-topk_f16` were written by the version-1 `storage_schemas` (commit
7e316e3), with `expected.json` holding the float32 arrays they were given. `data/v2-topk_idd_logq7`
is the same cache transcoded (`transcode_cache`, then in pipeline/encoding_study.py, now
storage_schemas/transcode.py) by the commit after 1927c1f, when `topk_idd_logq7` was the default:
caches written then must keep reading after the default moved.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages.student.collator import CacheCollator
from storage_schemas import Manifest
from storage_schemas.shard_io import decode_table, read_shard, verify_cache

DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("encoding", ["topk_f32", "topk_f16"])
def test_version_1_cache_reads_as_before(encoding):
    cache = DATA / f"v1-{encoding}"
    manifest = Manifest.load(cache)
    assert manifest.schema_version == 1 and manifest.settings.encoding == encoding
    assert verify_cache(cache, manifest) == []
    expected = json.loads((cache / "expected.json").read_text())
    k = manifest.settings.k
    got = [decode_table(read_shard(cache / s.file, encoding), encoding, k) for s in manifest.shards]
    ids, values, target = (np.concatenate(parts) for parts in zip(*got))
    np.testing.assert_array_equal(ids, np.concatenate([np.asarray(e["topk_ids"]) for e in expected]))
    want = np.concatenate([np.asarray(e["topk_logprobs"], np.float32) for e in expected])
    np.testing.assert_array_equal(values, want if encoding == "topk_f32" else want.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(target, np.concatenate([np.asarray(e["target_logprob"], np.float32) for e in expected]))


def test_version_1_rows_collate_like_before():
    cache = DATA / "v1-topk_f32"
    manifest = Manifest.load(cache)
    table = read_shard(cache / manifest.shards[0].file, "topk_f32")
    rows = [{name: np.asarray(value) for name, value in row.items()} for row in table.to_pylist()]
    batch = CacheCollator(pad_id=0, k=manifest.settings.k, encoding=manifest.settings.encoding)(rows)  # v1: a float encoding
    expected = json.loads((cache / "expected.json").read_text())[:2]
    np.testing.assert_array_equal(batch["teacher_topk_logprobs"].numpy(),
                                  np.concatenate([np.asarray(e["topk_logprobs"], np.float32) for e in expected]))


def test_version_2_logq7_cache_still_reads_within_its_promise():
    from codec_promises import value_promise

    from storage_schemas import get_encoding

    cache = DATA / "v2-topk_idd_logq7"
    manifest = Manifest.load(cache)
    assert manifest.schema_version == 2 and manifest.settings.encoding == "topk_idd_logq7"
    assert verify_cache(cache, manifest) == []
    expected = json.loads((cache / "expected.json").read_text())
    k = manifest.settings.k
    got = [decode_table(read_shard(cache / s.file, "topk_idd_logq7"), "topk_idd_logq7", k) for s in manifest.shards]
    ids, values, target = (np.concatenate(parts) for parts in zip(*got))
    want_ids = np.concatenate([np.asarray(e["topk_ids"]) for e in expected])
    want = np.concatenate([np.asarray(e["topk_logprobs"], np.float32) for e in expected])
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(want_ids, 1))
    order = np.argsort(-want, 1, kind="stable")  # both in descending probability
    assert value_promise(get_encoding("topk_idd_logq7"), np.take_along_axis(want, order, 1), values) == []  # 2^-8 nats
    np.testing.assert_array_equal(target, np.concatenate([np.asarray(e["target_logprob"], np.float32) for e in expected]))


def test_unknown_schema_version_is_refused_by_name(tmp_path):
    shutil.copytree(DATA / "v1-topk_f32", tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "manifest.json").read_text())
    raw["schema_version"] = 3
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"manifest.json: schema_version 3 is not supported \(this reader: \(1, 2\)"):
        Manifest.load(tmp_path / "c")


def test_version_1_manifest_cannot_claim_a_new_encoding(tmp_path):
    shutil.copytree(DATA / "v1-topk_f32", tmp_path / "c")
    raw = json.loads((tmp_path / "c" / "manifest.json").read_text())
    raw["settings"]["encoding"] = "topk_idd_logq7"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="schema_version 1 cannot hold encoding 'topk_idd_logq7'"):
        Manifest.load(tmp_path / "c")
