"""The study's pieces that run without a model: its candidate list and cache transcoding."""
from pathlib import Path

import numpy as np
from codec_promises import promise_violations

from pipeline.studies.encoding.candidates import candidates
from storage_schemas import DEFAULT_VALUE_ENCODING, Manifest, get_encoding
from storage_schemas.shard_io import decode_table, read_shard, verify_cache
from storage_schemas.transcode import transcode_cache

V1_CACHE = Path(__file__).parents[2] / "storage_schemas" / "data" / "v1-topk_f32"


def test_candidates_cover_the_issue_list_with_unique_names():
    encs = [enc for enc, _ in candidates()]
    assert len({e.name for e in encs}) == len(encs)
    assert {e.value_codec for e in encs} == {"f32", "f16", "bf16", "log_q", "sqrtp_q", "relpow_q"}
    assert DEFAULT_VALUE_ENCODING in {e.name.removeprefix("DEFAULT ") for e in encs}
    assert {e.id_order for e in encs} == {"prob", "id_delta"}
    assert {1, 3, 9, 19} <= {level for _, level in candidates()}
    assert any(e.dictionary for e in encs) and any(e.row_group_rows for e in encs)


def _decoded(cache: Path):
    manifest = Manifest.load(cache)
    parts = [decode_table(read_shard(cache / s.file, manifest.settings.encoding), manifest.settings.encoding,
                          manifest.settings.k) for s in manifest.shards]
    return [np.concatenate(p) for p in zip(*parts)]


def test_transcoding_a_version_1_cache_keeps_rows_and_values_within_the_promise(tmp_path):
    out = transcode_cache(V1_CACHE, tmp_path / "t", DEFAULT_VALUE_ENCODING)
    assert out.schema_version == 2 and out.settings.encoding == DEFAULT_VALUE_ENCODING and out.complete
    assert verify_cache(tmp_path / "t") == []
    assert out.token_ids_sha256 == Manifest.load(V1_CACHE).token_ids_sha256
    assert [s.token_ids_sha256 for s in out.shards] == [s.token_ids_sha256 for s in Manifest.load(V1_CACHE).shards]
    (ids0, lp0, t0), (ids1, lp1, t1) = _decoded(V1_CACHE), _decoded(tmp_path / "t")
    np.testing.assert_array_equal(np.sort(ids0, 1), np.sort(ids1, 1))
    order0, order1 = np.argsort(ids0, 1), np.argsort(ids1, 1)
    a0, a1 = np.take_along_axis(lp0, order0, 1), np.take_along_axis(lp1, order1, 1)
    assert promise_violations(get_encoding(DEFAULT_VALUE_ENCODING), a0, t0, a1, t1) == []  # docs/design.md §8


def test_floors_order_the_bounds_sensibly():
    """The per-id (order-0) bound on the id set is below the uniform one, and both are positive."""
    from pipeline.studies.encoding.measure import floors as _floors
    from storage_schemas.shard_io import ShardRow

    rng = np.random.default_rng(0)
    rows = []
    for i in range(20):
        n = 30
        logits = rng.normal(size=(n, 200)) * 2 + np.linspace(3, 0, 200)  # low ids likelier: a skewed id set
        lp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        top = np.argsort(-lp, 1)[:, 1:9]
        rows.append(ShardRow(i, rng.integers(0, 200, n + 1).astype(np.int32), np.ones(n, bool),
                             lp[:, 0].astype(np.float32), top.astype(np.int32),
                             np.take_along_axis(lp, top, 1).astype(np.float32)))
    floors = _floors(rows, 200)
    assert 0 < floors["ids_set_order0"] < floors["ids_uniform"]
    assert floors["values_id_order_order0"] > 0 and floors["permutation_at_most"] > 0


def test_training_curves_are_plotted_and_compared(tmp_path):
    from pipeline.studies.encoding.report import plot_training
    from pipeline.studies.encoding.training import max_step_difference as _max_step_difference

    header = "step,epoch,loss,ce,kl,learning_rate,grad_norm,tokens_per_s,elapsed_s"
    def log(shift):
        return [header] + [f"{s},0,{6 - s * 0.1 + shift},{6 - s * 0.1},{0.1 + shift},0,1,1,1" for s in range(1, 6)]
    training = {"steps": 5, "topk_f32": {"log": log(0.0), "cache_bytes_per_token": 155.0},
                DEFAULT_VALUE_ENCODING: {"log": log(1e-3), "cache_bytes_per_token": 47.0}}
    assert abs(_max_step_difference(training, "loss") - 1e-3) < 1e-9
    plot_training(training, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
