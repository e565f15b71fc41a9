"""The collator refuses a batch whose decoded teacher values are NaN or inf, naming the examples:
caches written before stage one checked its values (issue 14) must not reach the loss."""
import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.student.collator import CacheCollator
from storage_schemas.shard_io import ShardRow, rows_to_table, write_shard

K = 3


def shard_row(example_id: int, bad_position: int | None = None, bad_target: bool = False) -> ShardRow:
    """6 tokens, positions 1..4 trained; NaN top-k (and target) at `bad_position` if given."""
    mask = np.array([False, True, True, True, True])
    target = np.full(4, np.log(0.5), np.float32)
    topk = np.tile(np.log([0.2, 0.1, 0.05]).astype(np.float32), (4, 1))
    if bad_position is not None:
        topk[bad_position - 1] = np.nan
        target[bad_position - 1] = np.nan if bad_target else target[0]
    return ShardRow(example_id=example_id, input_ids=np.arange(6, dtype=np.int32) + 10, loss_mask=mask,
                    target_logprob=target, topk_ids=np.tile(np.arange(3, dtype=np.int32), (4, 1)) + 100 + example_id,
                    topk_logprobs=topk)


def cache_rows(rows: list[ShardRow], encoding: str, tmp_path) -> list[dict]:
    """Write the rows as a real shard (no stage-one check on this path) and read it back as numpy rows."""
    record = write_shard(tmp_path, 0, rows[0].example_id, rows_to_table(rows, encoding, K), zstd_level=3, truncated=0)
    table = pq.read_table(tmp_path / record.file)
    return [{name: np.asarray(value) for name, value in row.items()} for row in table.to_pylist()]


def test_non_finite_topk_in_a_float_cache_is_refused_naming_the_example(tmp_path):
    rows = cache_rows([shard_row(4), shard_row(5, bad_position=3), shard_row(6)], "topk_f32", tmp_path)
    collate = CacheCollator(pad_id=0, k=K, encoding="topk_f32")
    with pytest.raises(ValueError, match=r"non-finite teacher values \(encoding 'topk_f32'\) for 1 trained "
                                         r"position\(s\): example 5 \(first at position 3\)\."):
        collate(rows)
    collate([rows[0], rows[2]])  # the sound examples still collate


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the encoder meeting the NaN
def test_an_overflowed_position_in_the_default_encoding_is_refused(tmp_path):
    """What the unchecked stage one stored for an fp16 overflow: NaN target and top-k. The default
    encoding decodes the top-k as finite garbage (-8.4e6); the target stays NaN and is caught."""
    rows = cache_rows([shard_row(8, bad_position=2, bad_target=True), shard_row(9, bad_position=4, bad_target=True)],
                      "topk_idd_rel4q112", tmp_path)
    collate = CacheCollator(pad_id=0, k=K, encoding="topk_idd_rel4q112")
    with pytest.raises(ValueError, match=r"for 2 trained position\(s\): example 8 \(first at position 2\), "
                                         r"example 9 \(first at position 4\)\. .*cache.dtype=bfloat16 or float32"):
        collate(rows)


def test_minus_inf_below_the_sqrtp_grid_is_a_probability_of_zero(tmp_path):
    row = shard_row(1)
    row.topk_logprobs[:, 2] = -40.0  # sqrt(p) below half a step: code 0, decoded as -inf on purpose
    batch = CacheCollator(pad_id=0, k=K, encoding="topk_idd_sqrtp10")(cache_rows([row], "topk_idd_sqrtp10", tmp_path))
    assert np.isneginf(batch["teacher_topk_logprobs"][:, 2].numpy()).all()
