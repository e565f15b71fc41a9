"""The order of one round of an interleaved benchmark: every row in turn, rotated by the round.

    from pipeline.bench.interleave import rotated
    for round_ in range(warmup + repeats):
        for row in rotated(rows, round_):
            ...

Rotating the order each round means no row always runs first (after a warm-up, or after another row
that leaves caches cold), and load drifting on a shared machine hits every row alike.
"""
from __future__ import annotations

from typing import Sequence, TypeVar

__all__ = ["rotated"]

T = TypeVar("T")


def rotated(rows: Sequence[T], round_: int) -> list[T]:
    """`rows` starting at index round_ mod len(rows), wrapping around (a list; empty for no rows)."""
    if not rows:
        return []
    shift = round_ % len(rows)
    return list(rows[shift:]) + list(rows[:shift])
