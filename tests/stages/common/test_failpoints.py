"""stages/common/failpoints.py: unset or another index, `hit` returns; the named index kills the process
by SIGKILL (run in a child process: the test process must survive); a malformed value is refused."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common import failpoints

REPO = Path(__file__).resolve().parents[3]
CHILD = ("from stages.common import failpoints\nfor i in range(4):\n"
         "    failpoints.hit('after_shard_published', i)\n    print(i, flush=True)\n")


def run_child(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != failpoints.ENV_VAR}
    if value is not None:
        env[failpoints.ENV_VAR] = value
    return subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_the_named_shard_kills_the_process_right_there():
    killed = run_child("after_shard_published:2")
    assert killed.returncode == -signal.SIGKILL and killed.stdout.split() == ["0", "1"]
    for value in (None, "", "after_shard_published:7"):  # unset, empty, or a shard this run never publishes
        alive = run_child(value)
        assert alive.returncode == 0 and alive.stdout.split() == ["0", "1", "2", "3"], value


@pytest.mark.parametrize("value", ["after_shard_published", "after_shard_published:x", "before_everything:2",
                                   "after_shard_published:-1"])
def test_a_malformed_value_is_refused_by_name(monkeypatch, value):
    monkeypatch.setenv(failpoints.ENV_VAR, value)
    with pytest.raises(ValueError, match=f"MTCACHE_FAILPOINT={value!r}: expected NAME:INDEX"):
        failpoints.hit("after_shard_published", 0)
