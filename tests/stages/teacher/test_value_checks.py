"""check_teacher_scores: each refusal on its own hand-built row, and valid rows (incl. edge cases) pass."""
import numpy as np
import pytest

from stages.teacher.value_checks import LOGPROB_TOLERANCE, TeacherValueError, check_teacher_scores
from storage_schemas.shard_io import ShardRow

SOURCE = "/data/sft.jsonl"


def valid_row() -> ShardRow:
    """Example 7: 6 tokens, positions 1, 2, 4 trained, k = 3; a proper distribution at each."""
    input_ids = np.array([5, 10, 11, 12, 13, 14], np.int32)
    mask = np.array([False, True, True, False, True])
    target = np.log(np.array([0.5, 0.2, 0.9], np.float32))
    topk_ids = np.array([[20, 21, 22], [1, 2, 3], [30, 31, 32]], np.int32)  # targets 11, 12, 14: none among them
    topk = np.log(np.array([[0.2, 0.1, 0.1], [0.3, 0.3, 0.1], [0.05, 0.03, 0.01]], np.float32))
    return ShardRow(example_id=7, input_ids=input_ids, loss_mask=mask, target_logprob=target, topk_ids=topk_ids,
                    topk_logprobs=topk)


def refuse(row: ShardRow) -> TeacherValueError:
    with pytest.raises(TeacherValueError) as info:
        check_teacher_scores(row, SOURCE)
    message = str(info.value)
    assert message.startswith(f"{SOURCE}: example 7, position ") and isinstance(info.value, ValueError)
    return info.value


def test_valid_rows_pass():
    check_teacher_scores(valid_row(), SOURCE)
    row = valid_row()
    row.topk_logprobs[1] = np.log(0.25)           # ties are allowed
    row.target_logprob[2] = 0.0                   # p = 1 exactly is a log-prob
    row.topk_logprobs[2] = -np.float32(1e9)        # vanishing but finite
    check_teacher_scores(row, SOURCE)
    row.loss_mask[:] = False                      # no trained position: nothing to check
    row.target_logprob, row.topk_ids, row.topk_logprobs = (np.zeros(0, np.float32), np.zeros((0, 3), np.int32),
                                                           np.zeros((0, 3), np.float32))
    check_teacher_scores(row, SOURCE)


@pytest.mark.parametrize("where", ["target", "topk"])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_is_refused_with_the_overflow_hint(where, value):
    row = valid_row()
    if where == "target":
        row.target_logprob[1] = value
    else:
        row.topk_logprobs[1, 2] = value
    err = refuse(row)
    assert "position 2 (token 2 predicting token 3, id 12): a non-finite log-prob" in str(err)
    assert "fp16 overflows at 65504: try cache.dtype=bfloat16 or float32" in str(err)
    assert (err.example_id, err.position) == (7, 2)


def test_log_prob_above_zero_is_refused_beyond_rounding():
    row = valid_row()
    row.target_logprob[0] = LOGPROB_TOLERANCE / 2   # float rounding: accepted (p ~ 1, the rest ~ 0)
    row.topk_logprobs[0] = [-30.0, -31.0, -32.0]
    check_teacher_scores(row, SOURCE)
    row.topk_logprobs[2, 0] = 1e-5
    assert "position 4 (token 4 predicting token 5, id 14): a log-prob above 0" in str(refuse(row))


def test_target_among_the_topk_is_refused():
    row = valid_row()
    row.topk_ids[2, 1] = 14  # position 4 predicts token 5 = id 14
    assert "position 4 (token 4 predicting token 5, id 14): the target token among the top-k ids" in str(refuse(row))


def test_duplicate_ids_are_refused():
    row = valid_row()
    row.topk_ids[0] = [20, 22, 20]
    assert "position 1 (token 1 predicting token 2, id 11): a top-k id stored twice" in str(refuse(row))


def test_unsorted_topk_is_refused():
    row = valid_row()
    row.topk_logprobs[1] = np.log([0.3, 0.1, 0.2])
    assert "position 2 (token 2 predicting token 3, id 12): top-k log-probs not in descending order" in str(refuse(row))


def test_mass_above_one_is_refused():
    row = valid_row()
    row.topk_logprobs[2] = np.log([0.06, 0.03, 0.02])  # 0.9 + 0.11 = 1.01
    assert "position 4 (token 4 predicting token 5, id 14): p(target) + sum of top-k p above 1 + 0.0001" in str(refuse(row))
    row.topk_logprobs[2] = np.log([0.05, 0.03, 0.02])  # exactly 1: within float rounding
    check_teacher_scores(row, SOURCE)


def test_the_first_failing_check_and_position_are_named_with_a_count():
    row = valid_row()
    row.target_logprob[:] = np.nan
    row.topk_ids[0] = [11, 11, 11]  # also wrong, but non-finite is reported first
    err = refuse(row)
    assert "position 1 " in str(err) and "a non-finite log-prob" in str(err) and "3 of the example's 3 trained" in str(err)
