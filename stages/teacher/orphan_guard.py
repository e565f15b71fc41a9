"""Engine processes die with their parent, `kill -9` included.

    guard_descendants()        # once, before vLLM starts its engine-core and worker processes

vLLM runs its engine core and workers in child processes; when the parent is killed with SIGKILL
nothing in it runs, and those children (gigabytes of memory, a GPU's memory on a GPU machine) are
re-parented and keep running. `guard_descendants` starts a small watchdog process, in a session of
its own (so a terminal's Ctrl-C does not reach it), that records the parent's descendants while the
parent lives and kills the ones still running once the parent has died; then it exits. psutil
identifies a process by pid and start time, so a reused pid is never killed.

    python -m stages.teacher.orphan_guard PARENT_PID      (what guard_descendants starts)
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

__all__ = ["guard_descendants"]

POLL_SECONDS = 0.5
_started: dict[int, subprocess.Popen] = {}  # parent pid -> its watchdog (one per process)


def guard_descendants() -> subprocess.Popen:
    """The watchdog of this process (started on the first call). Returns its Popen."""
    pid = os.getpid()
    if pid not in _started or _started[pid].poll() is not None:
        _started[pid] = subprocess.Popen([sys.executable, "-m", "stages.teacher.orphan_guard", str(pid)],
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    return _started[pid]


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def watch(parent_pid: int) -> int:
    """Record `parent_pid`'s descendants until it dies, then kill those still running; returns how many."""
    import psutil

    me = os.getpid()
    try:
        parent = psutil.Process(parent_pid)
    except psutil.NoSuchProcess:
        return 0
    known: dict[int, psutil.Process] = {}
    while _alive(parent):
        try:
            known.update({p.pid: p for p in parent.children(recursive=True) if p.pid != me})
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_SECONDS)
    left = [p for p in known.values() if _alive(p)]
    for process in left:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return len(left)


if __name__ == "__main__":
    sys.exit(0 if watch(int(sys.argv[1])) >= 0 else 1)
