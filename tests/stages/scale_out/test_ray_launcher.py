"""`--launcher ray` on a local Ray instance with 2 workers: a worker process killed mid-run is
retried by Ray, resumes from its manifest part, and the merged cache equals a single-process run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_workers import assert_same_cache, config_args

from pipeline.config import load_config
from stages.cache_teacher import run_cache_teacher

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_ray_launcher_retries_a_killed_worker_and_matches_one_process(tiny_model_dir, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: " + "def f(x): return x * %d " % i * 4}) + "\n" for i in range(240)))
    args = config_args(tiny_model_dir, data, tmp_path / "ray", "cache.rows_per_shard=12", "cache.batch_tokens=256",
                       "data.max_length=96")
    run_cache_teacher(load_config(None, [*args, f"cache.dir={tmp_path / 'one'}"]))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "cache-teacher", "--config", "", *args,
                             "--launcher", "ray", "--num-workers", "2"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = tmp_path / "ray" / "parts" / "worker-00001-of-00002.json"
    killed, deadline = None, time.time() + 300
    while killed is None and time.time() < deadline and proc.poll() is None:
        raw = json.loads(part.read_text()) if part.exists() else {"shards": []}
        if 1 <= len(raw["shards"]) < 8:
            killed = int(raw["writer"].rsplit(":", 1)[1])  # the Ray worker process writing this part
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    assert killed is not None, "worker 1 finished before it could be killed"
    retried = json.loads(part.read_text())
    assert retried["complete"] and int(retried["writer"].rsplit(":", 1)[1]) != killed  # a new process finished it
    assert "ray: 2 workers" in out and "merged manifest: 20 shards, 240 examples" in out
    assert_same_cache(tmp_path / "ray", tmp_path / "one")
