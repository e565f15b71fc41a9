"""Clean stops of stage one (issue 24): after `kill -9` of a vLLM stage one no engine process is left
(stages/teacher/orphan_guard.py); Ctrl-C ends with one line saying the cache resumes and exit status
130; a rerun says at its start what it keeps."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_end_to_end import REPO

from storage_schemas import Manifest

# Stage one stops itself (SIGSTOP) once its first shard is published (stages/common/failpoints.py), so a
# Ctrl-C reaches a run that is still running however loaded the machine is.
PAUSE = {"MTCACHE_FAILPOINT": "pause_after_shard_published:0"}


def as_from_a_shell() -> None:
    """The child's SIGINT as a shell starts a command: the default action, unblocked. A library loaded in the
    test process (C code, invisible to signal.getsignal) may have set it ignored, which a child would inherit."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start(model_dir, data, cache, *extra, output=subprocess.PIPE, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "cache-teacher", "--config", "", f"model={model_dir}",
                             f"data.path={data}", f"cache.dir={cache}", "cache.k=8", "cache.rows_per_shard=2",
                             "data.max_length=64", *extra], cwd=REPO, stdout=output, stderr=output,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, preexec_fn=as_from_a_shell)


def paused(run: subprocess.Popen):
    """The run's process once it has stopped itself at the pause failpoint, else None."""
    process = psutil.Process(run.pid)
    return process if process.status() == psutil.STATUS_STOPPED else None


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := condition()):
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def long_data(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"text": f"{i}: def add(a, b): return a + b " * 3}) + "\n" for i in range(400)))
    return path


@pytest.mark.vllm
def test_kill_9_of_a_vllm_stage_one_leaves_no_engine_process(tiny_model_dir, long_data, tmp_path):
    # output to a file, not a pipe: orphans holding a pipe open would hang the reader instead of failing
    with open(tmp_path / "log.txt", "w") as log:
        run = start(tiny_model_dir, long_data, tmp_path / "cache", "cache.vllm_kv_cache_gib=0.25", output=log)
    parent = psutil.Process(run.pid)
    cache = tmp_path / "cache"
    wait_for(lambda: (cache / "manifest.json").exists() and Manifest.load(cache).shards, 180, "a first shard (the engine up)")
    watched = parent.children(recursive=True)  # the engine core, its workers, the guard
    assert any(p.name().startswith("VLLM") for p in watched), [p.name() for p in watched]
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    try:
        wait_for(lambda: not [p for p in watched if running(p)], 20, f"the engine processes {[p.pid for p in watched]} to end")
    finally:
        for process in (p for p in watched if running(p)):  # never leave them to the next test
            process.kill()


def running(process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.vllm
def test_ctrl_c_of_a_vllm_stage_one_prints_one_line_and_no_engine_dump(tiny_model_dir, long_data, tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group: the engine's processes (in a
    group of their own in a quiet run) are stopped by stage one, not left to print tracebacks."""
    cache = tmp_path / "cache"
    run = subprocess.Popen([sys.executable, "-m", "pipeline", "cache-teacher", "--config", "", f"model={tiny_model_dir}",
                            f"data.path={long_data}", f"cache.dir={cache}", "cache.k=8", "cache.rows_per_shard=2",
                            "data.max_length=64", "cache.vllm_kv_cache_gib=0.25"], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **PAUSE}, start_new_session=True,
                           preexec_fn=as_from_a_shell)
    stopped = wait_for(lambda: paused(run), 180, "stage one to pause after its first shard")
    engine = [p for p in stopped.children(recursive=True) if p.name().startswith("VLLM")]
    os.killpg(run.pid, signal.SIGINT)  # what the terminal does
    stopped.resume()  # the signal is delivered to a run that is certainly still running
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "Traceback" not in err and "Error" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"interrupted: {cache} keeps every shard finished so far")
    wait_for(lambda: not [p for p in engine if running(p)], 20, "the engine processes to end")


def test_ctrl_c_says_the_cache_resumes_and_a_rerun_says_what_it_keeps(tiny_model_dir, long_data, tmp_path):
    cache = tmp_path / "cache"
    run = start(tiny_model_dir, long_data, cache, "cache.engine=hf", "cache.batch_tokens=64", env=PAUSE)
    stopped = wait_for(lambda: paused(run), 120, "stage one to pause after its first shard")
    run.send_signal(signal.SIGINT)
    stopped.resume()
    out, err = run.communicate(timeout=60)
    assert run.returncode == 130, err
    assert err.strip().splitlines()[-1] == (f"interrupted: {cache} keeps every shard finished so far; rerun the same "
                                            "command to resume")
    assert "Traceback" not in err
    kept = len(Manifest.load(cache).shards)
    again = start(tiny_model_dir, long_data, cache, "cache.engine=hf", "cache.batch_tokens=64")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert f"resuming {cache}: keeping {kept} finished shard(s) of 200, computing {200 - kept}" in out + err
