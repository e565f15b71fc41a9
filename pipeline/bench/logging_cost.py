"""Logging's cost per stage-two step: `train.report_to: tensorboard` vs `none`, interleaved runs.

    python -m pipeline bench-logging                             (the demo's config and cache: make demo first)
    python -m pipeline bench-logging --runs 5 --steps 10 --batch-size 1   (cheaper: the cost per step is a fixed one)

Each run is a real `run_train` of the config (its cache, model and batch size) into a temporary
directory with `logging_steps=1` (every step logs: the worst case; the demo logs every 10th) and no
checkpoint before the last step. Runs alternate tensorboard, none, tensorboard, ... in one process,
so drifting machine load hits both alike. A run's figure is the median time between consecutive step
starts (the step, its log and the callbacks' writes) over steps 3..N-1 (the first two warm up; the
last also saves), and the median time from a step's end to the next step's start (its log with every
callback's writes, and the next batch's collation: no forward or backward, so much less exposed to
the machine's load). Printed: per setting the median over runs and the spread (min-max of the runs'
medians), and the difference of the medians.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import tempfile
import time
from pathlib import Path

from transformers import TrainerCallback

from pipeline.config import load_config
from stages.student.runner import run_train

__all__ = ["StepClock", "measure_logging_cost", "render", "bench_logging"]

SETTINGS = ("tensorboard", "none")
WARMUP_STEPS = 2


class StepClock(TrainerCallback):
    """Per step: start to next start (compute, log, callbacks), and end to next start (the log with every
    callback's writes, and the next batch's collation: no forward or backward, so far less load noise)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())

    def seconds(self) -> tuple[float, float]:
        """(step, between steps): medians over the steps after the warm-up, the last one (it saves) excluded."""
        steps = [b - a for a, b in zip(self.starts, self.starts[1:])][WARMUP_STEPS:]
        between = [b - a for a, b in zip(self.ends, self.starts[1:])][WARMUP_STEPS:]
        if not steps:
            raise ValueError(f"too few steps timed ({len(self.starts)}): use --steps > {WARMUP_STEPS + 1}")
        return statistics.median(steps), statistics.median(between)


def _one_run(config_path: str, report_to: str, steps: int, out: Path, batch_size: int) -> tuple[float, float]:
    config = load_config(config_path, [f"train.output_dir={out}", f"train.max_steps={steps}", "train.logging_steps=1",
                                       f"train.save_steps={steps}", f"train.report_to={report_to}"]
                         + ([f"train.batch_size={batch_size}"] if batch_size else []))
    if not Path(config.cache.dir, "manifest.json").exists():
        raise FileNotFoundError(f"{config.cache.dir}: no cache; run stage one first (make demo, or python -m pipeline cache)")
    clock = StepClock()
    with contextlib.redirect_stdout(io.StringIO()):  # each run's summary: not the bench's output
        run_train(config, callbacks=[clock])
    return clock.seconds()


def measure_logging_cost(config_path: str, runs: int = 5, steps: int = 14, batch_size: int = 0) -> dict:
    """{setting: [seconds per step of each run]} and the same for the time between steps, for tensorboard and
    none, interleaved, plus the machine's load."""
    per_setting: dict[str, list[float]] = {s: [] for s in SETTINGS}
    between: dict[str, list[float]] = {s: [] for s in SETTINGS}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-logging-") as tmp:
        for i in range(runs):
            for setting in SETTINGS:
                step, gap = _one_run(config_path, setting, steps, Path(tmp) / f"{setting}-{i}", batch_size)
                per_setting[setting].append(step)
                between[setting].append(gap)
    return {"seconds_per_step": per_setting, "seconds_between_steps": between,
            "runs": runs, "steps": steps, "config": config_path, "batch_size": batch_size,
            "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()}


def render(result: dict) -> str:
    """A markdown table: per setting and figure, the median and min-max over runs; the difference of the medians."""
    rows = ["| train.report_to | figure | runs | median of runs | min - max of runs |", "|---|---|---|---|---|"]
    diffs = []
    for key, label in (("seconds_per_step", "step (start to next start)"), ("seconds_between_steps", "between steps (log + collate)")):
        medians = {}
        for setting, values in result[key].items():
            medians[setting] = statistics.median(values)
            rows.append(f"| {setting} | {label} | {len(values)} | {medians[setting] * 1e3:.1f} ms | "
                        f"{min(values) * 1e3:.1f} - {max(values) * 1e3:.1f} ms |")
        diffs.append(f"{label}: {(medians['tensorboard'] - medians['none']) * 1e3:+.1f} ms")
    rows.append(f"\ntensorboard - none, medians: {'; '.join(diffs)}; "
                f"{result['steps']} steps per run (batch size {result['batch_size'] or 'as configured'}), logging every step; "
                f"{result['cpus']} CPUs, load average "
                f"{result['loadavg_before'][0]:.2f} before, {result['loadavg_after'][0]:.2f} after")
    return "\n".join(rows)


def bench_logging(config: str, runs: int = 5, steps: int = 14, batch_size: int = 0) -> dict:
    """`python -m pipeline bench-logging`: `measure_logging_cost` of the YAML `config`, printed as `render`'s table."""
    result = measure_logging_cost(config, runs, steps, batch_size)
    print(render(result))
    return result
