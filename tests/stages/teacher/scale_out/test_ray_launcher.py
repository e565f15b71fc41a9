"""`--launcher ray` on a local Ray instance with 2 workers: a worker process killed right after its
second shard is published (a failpoint, stages/common/failpoints.py) is retried by Ray, resumes from its
manifest part without redoing a shard, and the merged cache equals a single-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_workers import assert_same_cache, config_args

from pipeline.config import load_config
from stages.common.failpoints import ENV_VAR as FAILPOINT_ENV
from stages.teacher.runner import run_cache_teacher

REPO = Path(__file__).resolve().parents[4]


@pytest.mark.slow
def test_ray_launcher_retries_a_killed_worker_and_matches_one_process(tiny_model_dir, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: " + "def f(x): return x * %d " % i * 4}) + "\n" for i in range(96)))
    args = config_args(tiny_model_dir, data, tmp_path / "ray", "cache.batch_tokens=256", "data.max_length=96")
    run_cache_teacher(load_config(None, [*args, f"cache.dir={tmp_path / 'one'}"]))  # 12 shards of 8
    # shard 3 is worker 1's second (shards 1, 3, ..., 11): its first attempt dies by SIGKILL right after
    # publishing it; the retry finds 1 and 3 in its part, so it never reaches the failpoint again
    result = subprocess.run([sys.executable, "-m", "pipeline", "cache-teacher", "--config", "", *args,
                             "--launcher", "ray", "--num-workers", "2"],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, FAILPOINT_ENV: "after_shard_published:3"})
    assert result.returncode == 0, result.stderr[-4000:]
    # each line is the attempt that finished: worker 0 ran once, worker 1's retry did the 4 left
    assert "worker 0 of 2 (ray): 6 shards assigned, 6 written now" in result.stdout
    assert "worker 1 of 2 (ray): 6 shards assigned, 4 written now" in result.stdout, result.stdout
    assert "ray: 2 workers" in result.stdout and "merged manifest: 12 shards, 96 examples" in result.stdout
    part = json.loads((tmp_path / "ray" / "parts" / "worker-00001-of-00002.json").read_text())
    assert part["complete"] and [r["index"] for r in part["shards"]] == [1, 3, 5, 7, 9, 11]
    assert_same_cache(tmp_path / "ray", tmp_path / "one")
