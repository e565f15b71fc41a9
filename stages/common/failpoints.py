"""Failpoints: kill this process hard at a named point of stage one, chosen by an environment
variable, so that a test stops a run at an exact place instead of racing the clock.

    MTCACHE_FAILPOINT=after_shard_published:3 python -m pipeline cache-teacher --config C

kills the process that publishes shard 3 right after it is durably published (the shard file
renamed into place, then the manifest, or the worker's manifest part, saved listing it). The kill
is SIGKILL sent to itself: no `finally`, no `atexit`, no flush, no shard-writer drain, as when the
OOM killer or a lost node ends a run. A resumed run (or a Ray retry) finds shard 3 already
published and never reaches the point again, so it runs to the end.

Points (the only ones; an unknown name or a malformed value is a ValueError at the first `hit`):
    after_shard_published:I    shard index I (0-based, the `shard-IIIII.parquet` number)
    after_shard_renamed:I      shard I's file renamed into place, the manifest not yet saved listing it
    pause_after_shard_published:I   not a kill: the process stops itself (SIGSTOP) once shard I is
                               published, so a test can deliver a signal (Ctrl-C) to a run that is
                               certainly still running, then SIGCONT it

Unset, `hit` costs one environment lookup per shard. Never set it outside tests.
"""
from __future__ import annotations

import os
import signal

__all__ = ["ENV_VAR", "POINTS", "hit"]

ENV_VAR = "MTCACHE_FAILPOINT"
POINTS = ("after_shard_published", "after_shard_renamed", "pause_after_shard_published")


def _parse(value: str) -> tuple[str, int]:
    name, _, arg = value.partition(":")
    if name not in POINTS or not arg.isdigit():
        raise ValueError(f"{ENV_VAR}={value!r}: expected NAME:INDEX with NAME in {', '.join(POINTS)} (e.g. after_shard_published:2)")
    return name, int(arg)


def hit(point: str, index: int) -> None:
    """SIGKILL this process if MTCACHE_FAILPOINT names `point` at `index` (SIGSTOP it for `pause_<point>`);
    otherwise return."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return
    name, at = _parse(value)
    if (name, at) == (point, index):
        os.kill(os.getpid(), signal.SIGKILL)
    elif (name, at) == (f"pause_{point}", index):
        os.kill(os.getpid(), signal.SIGSTOP)
