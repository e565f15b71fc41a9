"""The study's pieces that run without a model: its candidate list and cache transcoding."""
from pathlib import Path

import numpy as np

from pipeline.encoding_study import candidates, transcode_cache
from storage_schemas import DEFAULT_ENCODING, Manifest, get_encoding
from storage_schemas.codecs import value_error_bound
from storage_schemas.shard_io import decode_table, read_shard, verify_cache

V1_CACHE = Path(__file__).parents[1] / "storage_schemas" / "data" / "v1-topk_f32"


def test_candidates_cover_the_issue_list_with_unique_names():
    encs = [enc for enc, _ in candidates()]
    assert len({e.name for e in encs}) == len(encs)
    assert {e.value_codec for e in encs} == {"f32", "f16", "bf16", "log_q", "sqrtp_q"}
    assert {e.id_order for e in encs} == {"prob", "id_delta"}
    assert {level for _, level in candidates()} == {1, 3, 9, 19}
    assert any(e.dictionary for e in encs) and any(e.row_group_rows for e in encs)


def _decoded(cache: Path):
    manifest = Manifest.load(cache)
    parts = [decode_table(read_shard(cache / s.file, manifest.settings.encoding), manifest.settings.encoding,
                          manifest.settings.k) for s in manifest.shards]
    return [np.concatenate(p) for p in zip(*parts)]


def test_transcoding_a_version_1_cache_keeps_rows_and_values_within_the_bound(tmp_path):
    out = transcode_cache(V1_CACHE, tmp_path / "t", DEFAULT_ENCODING)
    assert out.schema_version == 2 and out.settings.encoding == DEFAULT_ENCODING and out.complete
    assert verify_cache(tmp_path / "t") == []
    assert out.token_ids_sha256 == Manifest.load(V1_CACHE).token_ids_sha256
    assert [s.token_ids_sha256 for s in out.shards] == [s.token_ids_sha256 for s in Manifest.load(V1_CACHE).shards]
    (ids0, lp0, t0), (ids1, lp1, t1) = _decoded(V1_CACHE), _decoded(tmp_path / "t")
    np.testing.assert_array_equal(np.sort(ids0, 1), np.sort(ids1, 1))
    order0, order1 = np.argsort(ids0, 1), np.argsort(ids1, 1)
    a0, a1 = np.take_along_axis(lp0, order0, 1), np.take_along_axis(lp1, order1, 1)
    assert np.all(np.abs(a1 - a0) <= value_error_bound(get_encoding(DEFAULT_ENCODING), a0) + 1e-6)
    np.testing.assert_array_equal(t0, t1)
