"""Refuse teacher values that cannot be a teacher's log-probs, before stage one stores them.

    from stages.teacher.value_checks import check_teacher_scores
    check_teacher_scores(row, source=config.data.path)    # raises TeacherValueError, else None

Stage one calls this on every sequence's row before the row is handed to the shard writer, so a
shard holding a wrong value is never written (an fp16 teacher whose forward overflowed returns NaN
log-probs; stored, they decode as finite garbage, e.g. -8.4e6 in the quantized encodings, and
stage two would train on it). Checked per trained position, in this order (the first failing check
is reported, at its first failing position):

1. every value finite (the target's and the k top-k log-probs);
2. every log-prob <= LOGPROB_TOLERANCE (1e-6): a log-softmax is <= 0, and the engines compute it in
   float32 as x - max - log(sum) with sum >= 1, so only a foreign rounding could exceed 0 at all;
3. no top-k id equal to the target token (the top-k holds non-target tokens only, docs/design.md §3);
4. no id twice within a position;
5. the k log-probs non-increasing (descending teacher probability; ties allowed);
6. p(target) + sum of the k top-k probabilities <= 1 + MASS_TOLERANCE (1e-4): probabilities of
   distinct tokens; float32 log-probs of k+1 tokens sum to 1 within ~1e-6, so 1e-4 only catches
   values not normalized over the vocabulary;
7. (encodings with tail draws) no draw equal to the target;
8. (ditto) the tail entropy finite and >= 0.
"""
from __future__ import annotations

import numpy as np

from storage_schemas.shard_io import ShardRow

__all__ = ["check_teacher_scores", "TeacherValueError", "LOGPROB_TOLERANCE", "MASS_TOLERANCE"]

LOGPROB_TOLERANCE = 1e-6
MASS_TOLERANCE = 1e-4

_OVERFLOW_HINT = ("the teacher's forward overflowed? fp16 overflows at 65504: try cache.dtype=bfloat16 or "
                  "float32")
_ENGINE_HINT = "the teacher engine's output is wrong (an engine bug, not the data)"


class TeacherValueError(ValueError):
    """A teacher value that is no log-prob: names the data file, example, position and check."""

    def __init__(self, message: str, *, example_id: int, position: int, check: str):
        super().__init__(message)
        self.example_id, self.position, self.check = example_id, position, check


def _failures(row: ShardRow) -> list[tuple[str, np.ndarray, str]]:
    """(what is wrong, bad [n] bool, hint) for each check, in the order they are reported."""
    target = np.asarray(row.target_logprob, np.float64)
    topk = np.asarray(row.topk_logprobs, np.float64)
    ids = np.asarray(row.topk_ids)
    targets = np.asarray(row.input_ids)[1:][np.asarray(row.loss_mask, bool)]
    finite = np.isfinite(target) & np.isfinite(topk).all(axis=1)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite positions are reported by check 1
        sorted_ids = np.sort(ids, axis=1)
        return [
            ("a non-finite log-prob", ~finite, _OVERFLOW_HINT),
            (f"a log-prob above 0 (tolerance {LOGPROB_TOLERANCE:g})",
             (target > LOGPROB_TOLERANCE) | (topk > LOGPROB_TOLERANCE).any(axis=1),
             "log-probs are <= 0: the engine returned something other than a log-softmax"),
            ("the target token among the top-k ids", (ids == targets[:, None]).any(axis=1),
             f"the top-k must hold non-target tokens only: {_ENGINE_HINT}"),
            ("a top-k id stored twice", (np.diff(sorted_ids, axis=1) == 0).any(axis=1), _ENGINE_HINT),
            ("top-k log-probs not in descending order", (np.diff(topk, axis=1) > 0).any(axis=1), _ENGINE_HINT),
            (f"p(target) + sum of top-k p above 1 + {MASS_TOLERANCE:g}",
             np.exp(target) + np.exp(topk).sum(axis=1) > 1 + MASS_TOLERANCE,
             "the log-probs are not normalized over the vocabulary"),
            *_draw_failures(row, targets),
        ]


def _draw_failures(row: ShardRow, targets: np.ndarray) -> list[tuple[str, np.ndarray, str]]:
    """Checks 7-8, for encodings with tail draws: no draw equal to the target; a finite tail entropy >= 0."""
    if row.tail_draw_ids is None:
        return []
    entropy = np.asarray(row.tail_entropy, np.float64)
    return [("a tail draw equal to the target", (np.asarray(row.tail_draw_ids) == targets[:, None]).any(axis=1), _ENGINE_HINT),
            ("a tail entropy that is not finite and >= 0", ~(np.isfinite(entropy) & (entropy >= 0)), _ENGINE_HINT)]


def check_teacher_scores(row: ShardRow, source: str) -> None:
    """Raise TeacherValueError for the first check (module docstring) that a position of `row` fails.

    Args:
        row: one sequence as stage one stores it: input_ids [T] int, loss_mask [T-1] bool, and for
            its n = loss_mask.sum() trained positions target_logprob [n] float, topk_ids [n, k] int,
            topk_logprobs [n, k] float.
        source: the data file (config.data.path), named in the message.

    Raises:
        ValueError (from `ShardRow.check`) if the arrays disagree in shape; TeacherValueError naming
        `source`, the example id, the position (token index i, predicting token i+1), the values
        there, how many of the example's trained positions fail, and a hint.
    """
    draws = np.shape(row.tail_draw_ids)[-1] if row.tail_draw_ids is not None else 0
    row.check(np.asarray(row.topk_ids).shape[-1], draws)
    positions = np.flatnonzero(np.asarray(row.loss_mask, bool))
    for what, bad, hint in _failures(row):
        if bad.any():
            j = int(np.argmax(bad))
            i = int(positions[j])
            raise TeacherValueError(
                f"{source}: example {row.example_id}, position {i} (token {i} predicting token {i + 1}, id "
                f"{int(row.input_ids[i + 1])}): {what} (target log-prob {float(row.target_logprob[j]):.6g}, "
                f"top-k {_entries(row.topk_ids[j], row.topk_logprobs[j])}); {int(bad.sum())} of the example's "
                f"{len(bad)} trained positions fail this check. Hint: {hint}. Nothing of its shard was written.",
                example_id=int(row.example_id), position=i, check=what)


def _entries(ids: np.ndarray, logprobs: np.ndarray, shown: int = 8) -> str:
    """'id:log-prob' pairs of one position, the first `shown` of them (k may be the whole vocabulary)."""
    pairs = [f"{int(t)}:{float(v):.6g}" for t, v in zip(ids[:shown], logprobs[:shown])]
    return "[" + ", ".join(pairs) + (", ...]" if len(ids) > shown else "]")
