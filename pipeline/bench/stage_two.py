"""Bench section (b) and the stage-two columns of (d), on `pipeline.bench.step`.

(b): CE-only LoRA step (`none`) vs cached `tail` vs `live`, same synthetic batch: median step time
(estimators interleaved in one process) and peak RSS (each estimator in a fresh process).
(d): the `tail` / `none` step-time ratio at other k, lengths and vocabularies (time only, one fresh
process per model, estimators interleaved).
"""
from __future__ import annotations

from pipeline.bench.settings import BenchSettings
from pipeline.bench.step import compare, measure_time

__all__ = ["measure_steps", "tail_ratio_rows"]


def measure_steps(model: str, s: BenchSettings) -> dict:
    """estimator -> {step_s, time_ratio, peak_mib, peak_ratio, ...} (measure_step.compare)."""
    return compare(model, batch=s.batch, seq=s.length, k=s.k, steps=s.steps, warmup=s.warmup)


def _tail_ratio(model: str, s: BenchSettings, k: int, length: int) -> dict:
    times = measure_time(model, ["none", "tail"], batch=s.batch, seq=length, k=k, steps=s.steps, warmup=s.warmup)
    return {"k": k, "length": length, "none_step_s": times["none"]["step_s"], "tail_step_s": times["tail"]["step_s"],
            "tail_over_none": times["tail"]["step_s"] / times["none"]["step_s"]}


def tail_ratio_rows(model: str, s: BenchSettings, points: list[tuple[int, int]]) -> list[dict]:
    """`tail` / `none` step time at each (k, length) point (in this process: ratios need no fresh one)."""
    return [_tail_ratio(model, s, k, length) for k, length in points]
