"""Every encoding round-trips through a real zstd Parquet shard within its stated bound."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from storage_schemas import ENCODINGS, Encoding, get_encoding, shard_file_name
from storage_schemas.codecs import decode_teacher, encode_teacher, value_error_bound
from storage_schemas.shard_io import ShardRow, decode_table, parquet_options, read_shard, rows_to_table, write_shard

K = 16
_BSS = ("input_ids", "target_logprob", "topk_ids", "topk_logprobs")


def teacher_rows(k: int = K, vocab: int = 300, seed: int = 0, scale: float = 3.0) -> list[ShardRow]:
    """Rows with real log-softmax values (peaked at `scale` = 3, flat at 0.1), some positions untrained."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(7):
        t = int(rng.integers(2, 40))
        mask = rng.random(t - 1) < 0.8
        n = int(mask.sum())
        logits = rng.normal(size=(n, vocab)) * scale
        lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        target = rng.integers(0, vocab, n)
        a_y = lp[np.arange(n), target].copy()
        lp[np.arange(n), target] = -np.inf
        top = np.argsort(-lp, 1, kind="stable")[:, :k]
        rows.append(ShardRow(i, rng.integers(0, vocab, t).astype(np.int32), mask, a_y.astype(np.float32),
                             top.astype(np.int32), np.take_along_axis(lp, top, 1).astype(np.float32)))
    return rows


AD_HOC = [
    Encoding("bf16 values and target", "topk_nontarget", "", value_codec="bf16", target_codec="bf16"),
    Encoding("f16 target", "topk_nontarget", "", target_codec="f16"),
    Encoding("log_q rank-delta", "topk_nontarget", "", value_codec="log_q", value_step=2.0 ** -6,
             value_max_code=65535, value_delta=True, byte_stream_split=_BSS),
    Encoding("log_q uint4 range [-7.5, 0]", "topk_nontarget", "", value_codec="log_q", value_step=0.5,
             value_max_code=15),
    Encoding("sqrtp rank-delta", "topk_nontarget", "", value_codec="sqrtp_q", value_step=2.0 ** -8,
             value_max_code=256, value_delta=True),
    Encoding("id-delta + dictionary + row groups", "topk_nontarget", "", id_order="id_delta",
             dictionary=("topk_ids",), row_group_rows=2),
]
ALL = list(ENCODINGS.values()) + AD_HOC


def _by_id(ids: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(ids, 1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(values, order, 1)


@pytest.mark.parametrize("enc", ALL, ids=[e.name for e in ALL])
@pytest.mark.parametrize("scale", [3.0, 0.1], ids=["peaked", "flat"])
def test_round_trip_within_the_stated_bound(enc, scale, tmp_path):
    rows = teacher_rows(scale=scale)
    record = write_shard(tmp_path, 0, 0, rows_to_table(rows, enc, K), zstd_level=3, truncated=0)
    table = pq.read_table(tmp_path / record.file)
    ids, values, target = decode_table(table, enc, K)
    want_ids = np.concatenate([r.topk_ids for r in rows]).astype(np.int64)
    want_values = np.concatenate([r.topk_logprobs for r in rows])
    want_target = np.concatenate([r.target_logprob for r in rows])
    assert ids.dtype == np.int64 and values.dtype == np.float32 and target.dtype == np.float32
    # ids are lossless as a set per position; each value is within the codec's bound of its id's value
    got_ids, got_values = _by_id(ids, values)
    ref_ids, ref_values = _by_id(want_ids, want_values)
    np.testing.assert_array_equal(got_ids, ref_ids)
    bound = value_error_bound(enc, ref_values)
    finite = np.isfinite(bound)
    assert np.all(np.abs(got_values - ref_values)[finite] <= bound[finite] * (1 + 1e-6) + 1e-6)
    if not finite.all():  # only sqrtp_q has a floor: values below its grid decode to -inf (dropped)
        assert np.all(got_values[~finite] == -np.inf)
    assert np.all(np.diff(values, axis=1) <= 0)  # decoded in descending probability
    target_bound = value_error_bound(Encoding("t", "topk_nontarget", "", value_codec=enc.target_codec), want_target)
    assert np.all(np.abs(target - want_target) <= target_bound * (1 + 1e-6) + 1e-7)
    # the input ids and masks are stored exactly, whatever the encoding
    for row, got in zip(rows, table.select(["input_ids", "loss_mask"]).to_pylist()):
        np.testing.assert_array_equal(got["input_ids"], row.input_ids)
        np.testing.assert_array_equal(got["loss_mask"], row.loss_mask)


def test_lossless_encodings_are_exact(tmp_path):
    rows = teacher_rows()
    for enc in (get_encoding("topk_f32"), Encoding("idd", "topk_nontarget", "", id_order="id_delta")):
        record = write_shard(tmp_path, 0, 0, rows_to_table(rows, enc, K), zstd_level=3, truncated=0)
        ids, values, target = decode_table(pq.read_table(tmp_path / record.file), enc, K)
        np.testing.assert_array_equal(values, np.concatenate([r.topk_logprobs for r in rows]))
        np.testing.assert_array_equal(ids, np.concatenate([r.topk_ids for r in rows]))  # no ties here
        np.testing.assert_array_equal(target, np.concatenate([r.target_logprob for r in rows]))


def test_bf16_matches_torch_rounding():
    import torch

    x = np.random.default_rng(0).normal(size=1000).astype(np.float32) * 10
    enc = Encoding("b", "topk_nontarget", "", value_codec="bf16")
    _, decoded, _ = decode_teacher(enc, *encode_teacher(enc, np.zeros((1000, 1)), x[:, None], x), 1)
    np.testing.assert_array_equal(decoded[:, 0], torch.from_numpy(x).bfloat16().float().numpy())


def test_log_q_clamps_below_its_stated_range():
    enc = Encoding("u4", "topk_nontarget", "", value_codec="log_q", value_step=0.5, value_max_code=15)
    a = np.array([[-0.2, -3.3, -7.5, -20.0]], np.float32)
    _, decoded, _ = decode_teacher(enc, *encode_teacher(enc, np.arange(4)[None], a, np.zeros(1)), 4)
    np.testing.assert_array_equal(decoded, [[0.0, -3.5, -7.5, -7.5]])


def test_the_shard_declares_its_encoding_and_layout(tmp_path):
    enc = get_encoding("topk_idd_logq7")
    record = write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), enc.name, K), zstd_level=3, truncated=0)
    meta = pq.read_schema(tmp_path / record.file).metadata
    assert meta[b"mtcache.schema_version"] == b"2" and meta[b"mtcache.encoding"] == b"topk_idd_logq7"
    assert Encoding.from_spec_json(meta[b"mtcache.encoding_spec"].decode()).spec_json() == enc.spec_json()
    columns = pq.ParquetFile(tmp_path / record.file).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert "BYTE_STREAM_SPLIT" in encodings["topk_logprobs.list.element"]
    assert parquet_options(enc)["use_dictionary"] is False


def test_row_groups_follow_the_encoding(tmp_path):
    enc = Encoding("rg", "topk_nontarget", "", row_group_rows=2)
    record = write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), enc, K), zstd_level=3, truncated=0)
    assert pq.ParquetFile(tmp_path / record.file).num_row_groups == 4  # 7 rows in groups of 2


# --- refusals -----------------------------------------------------------------------------------
def test_a_shard_of_another_encoding_is_refused_naming_both(tmp_path):
    write_shard(tmp_path, 0, 0, rows_to_table(teacher_rows(), "topk_idd_logq7", K), zstd_level=3, truncated=0)
    with pytest.raises(ValueError, match=r"shard-00000.parquet: written with encoding 'topk_idd_logq7'.*'topk_f32'"):
        read_shard(tmp_path / shard_file_name(0), "topk_f32")


def test_float_decoder_refuses_integer_codes():
    enc = get_encoding("topk_idd_logq7")
    ids, codes, target = encode_teacher(enc, np.arange(4)[None], np.full((1, 4), -1.0, np.float32), np.zeros(1))
    with pytest.raises(ValueError, match="integer codes mean another encoding"):
        decode_teacher(get_encoding("topk_f32"), ids, codes, target, 4)


@pytest.mark.parametrize("bad, message", [
    (dict(id_order="random"), "id_order 'random'"),
    (dict(value_codec="int3"), "value_codec 'int3'"),
    (dict(value_codec="log_q"), "needs value_step > 0"),
    (dict(value_delta=True), "value_delta applies to quantized codecs only"),
    (dict(byte_stream_split=("logits",)), "unknown column 'logits'"),
])
def test_bad_encoding_specs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Encoding("bad", "topk_nontarget", "", **bad)
