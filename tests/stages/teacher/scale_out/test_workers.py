"""Data-parallel stage one: N workers write the single-process cache byte for byte, a killed worker
resumes its own shards only, and the merge refuses parts that do not add up to one cache."""
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from file_states import files_state

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stages.common.failpoints import ENV_VAR as FAILPOINT_ENV
from stages.teacher.runner import run_cache_teacher, teacher_job
from stages.teacher.scale_out.merge import MergeError, merge_parts
from stages.teacher.scale_out.parts import WorkerSpec, assigned_shards, resolve_worker
from stages.teacher.scale_out.workers import run_worker
from storage_schemas import Manifest
from storage_schemas.fingerprints import files_sha256
from storage_schemas.shard_io import verify_cache

REPO = Path(__file__).resolve().parents[4]


def config_args(model_dir, data_path, cache_dir, *extra) -> list[str]:
    return [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}", "cache.engine=hf",
            "cache.k=8", "cache.rows_per_shard=8", "data.max_length=48", *extra]


def cli(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def shard_hashes(cache_dir: Path) -> dict[str, str]:
    return {p.name: files_sha256([p], with_names=False) for p in sorted(Path(cache_dir).glob("shard-*.parquet"))}


def assert_same_cache(cache: Path, reference: Path) -> None:
    """Same shard files (bytes), same shard records and token hash; only created_at may differ."""
    mine, ref = Manifest.load(cache), Manifest.load(reference)
    assert mine.complete and shard_hashes(cache) == shard_hashes(reference)
    assert [asdict(r) for r in mine.shards] == [asdict(r) for r in ref.shards]
    assert mine.token_ids_sha256 == ref.token_ids_sha256
    for group in ("teacher", "tokenizer", "dataset", "settings", "engine"):
        assert getattr(mine, group) == getattr(ref, group), group
    assert verify_cache(cache) == []


# --- who am I ------------------------------------------------------------------------------------
def test_rank_and_size_from_flags_slurm_and_torchrun():
    assert resolve_worker(env={}) == WorkerSpec(0, 1, "single")
    slurm = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert resolve_worker(env=slurm) == WorkerSpec(2, 4, "slurm")
    assert resolve_worker(env={"RANK": "1", "WORLD_SIZE": "2"}) == WorkerSpec(1, 2, "torchrun")
    assert resolve_worker(3, 2, env={"RANK": "1", "WORLD_SIZE": "2"}) == WorkerSpec(2, 3, "flags")
    with pytest.raises(ValueError, match="--worker-rank"):
        resolve_worker(num_workers=3, env={})
    with pytest.raises(ValueError, match="rank 4 of 4"):
        resolve_worker(4, 4, env={})
    assert assigned_shards(7, WorkerSpec(1, 3)) == [1, 4]
    assert sorted(i for r in range(3) for i in assigned_shards(7, WorkerSpec(r, 3))) == list(range(7))


# --- the real CLI path: vLLM, two concurrent worker processes -----------------------------------
@pytest.mark.vllm
@pytest.mark.slow
def test_two_vllm_workers_write_the_single_process_cache(tiny_model_dir, tiny_jsonl, tmp_path):
    args = [f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "cache.engine=vllm", "cache.k=8",
            "cache.rows_per_shard=8", "data.max_length=48"]
    # all three at once: engine starts overlap (the results do not depend on timing)
    single = cli("cache-teacher", "--config", "", *args, f"cache.dir={tmp_path / 'one'}")
    workers = [cli("cache-teacher", "--config", "", *args, f"cache.dir={tmp_path / 'two'}", "--num-workers", "2",
                   "--worker-rank", str(rank)) for rank in (0, 1)]
    outputs = [w.communicate() for w in workers]
    assert single.wait() == 0, single.communicate()[1][-3000:]
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outputs]
    assert sum("merged manifest: 4 shards, 30 examples" in out for out, _ in outputs) >= 1
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == [
        "worker-00000-of-00002.json", "worker-00001-of-00002.json"]
    assert Manifest.load(tmp_path / "two").engine.name == "vllm"
    assert_same_cache(tmp_path / "two", tmp_path / "one")


# --- in-process workers (hf engine) and the merge's refusals -------------------------------------
@pytest.fixture(scope="module")
def two_worker_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    """(2-worker cache, single-process cache) of the same 30 examples, 4 shards."""
    root = tmp_path_factory.mktemp("workers")
    run_cache_teacher(load_config(None, config_args(tiny_model_dir, tiny_jsonl, root / "one")))
    config = load_config(None, config_args(tiny_model_dir, tiny_jsonl, root / "two"))
    first = run_worker(teacher_job(config), WorkerSpec(0, 2))
    assert first.merged is None and first.shards_written_now == 2  # worker 1 has not run yet
    second = run_worker(teacher_job(config), WorkerSpec(1, 2))
    assert second.merged is not None and second.merged.complete
    return root / "two", root / "one"


def test_in_process_workers_equal_single_process_and_rerun_is_a_no_op(two_worker_cache, tiny_model_dir, tiny_jsonl):
    cache, reference = two_worker_cache
    assert_same_cache(cache, reference)
    config = load_config(None, config_args(tiny_model_dir, tiny_jsonl, cache))
    assert run_worker(teacher_job(config), WorkerSpec(1, 2)).shards_written_now == 0


@pytest.fixture
def parts_copy(two_worker_cache, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(two_worker_cache[0], out)
    (out / "manifest.json").unlink()  # as before the merge
    return out


def edit_part(cache: Path, rank: int, change) -> None:
    path = cache / "parts" / f"worker-{rank:05d}-of-00002.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def test_merge_of_intact_parts_equals_the_single_process_manifest(parts_copy, two_worker_cache, capsys):
    assert cli_main(["merge-manifest", str(parts_copy)]) == 0
    assert "merged 4 shards, 30 examples" in capsys.readouterr().out
    assert_same_cache(parts_copy, two_worker_cache[1])


def test_merge_refuses_a_missing_part(parts_copy, capsys):
    (parts_copy / "parts" / "worker-00001-of-00002.json").unlink()
    with pytest.raises(MergeError, match=r"no part from worker\(s\) \[1\] of 2"):
        merge_parts(str(parts_copy))
    assert cli_main(["merge-manifest", str(parts_copy)]) == 2 and "worker(s) [1]" in capsys.readouterr().err
    assert not (parts_copy / "manifest.json").exists()


def test_merge_refuses_overlapping_parts(parts_copy):
    shard_0 = json.loads((parts_copy / "parts" / "worker-00000-of-00002.json").read_text())["shards"][0]
    edit_part(parts_copy, 1, lambda raw: raw["shards"].append(shard_0))
    with pytest.raises(MergeError, match="shard 0 is listed by both parts/worker-00000-of-00002.json and "
                                         "parts/worker-00001-of-00002.json"):
        merge_parts(str(parts_copy))


def test_merge_refuses_an_unfinished_worker_a_missing_shard_and_mixed_runs(parts_copy):
    original = (parts_copy / "parts" / "worker-00001-of-00002.json").read_text()
    edit_part(parts_copy, 1, lambda raw: raw.update(shards=raw["shards"][:1], complete=False))
    with pytest.raises(MergeError, match=r"worker 1 .* has not finished: shard\(s\) \[3\] missing"):
        merge_parts(str(parts_copy))
    (parts_copy / "parts" / "worker-00001-of-00002.json").write_text(original)
    (parts_copy / "shard-00002.parquet").rename(parts_copy / "elsewhere.parquet")
    with pytest.raises(MergeError, match="shard-00002.parquet: missing"):
        merge_parts(str(parts_copy))
    (parts_copy / "elsewhere.parquet").rename(parts_copy / "shard-00002.parquet")
    edit_part(parts_copy, 1, lambda raw: raw["settings"].update(k=4))
    with pytest.raises(MergeError, match=r"different caches: settings\.k differs"):
        merge_parts(str(parts_copy))
    (parts_copy / "parts" / "worker-00001-of-00002.json").write_text(original)
    shutil.copy(parts_copy / "parts" / "worker-00000-of-00002.json", parts_copy / "parts" / "worker-00000-of-00003.json")
    with pytest.raises(MergeError, match="different worker counts"):
        merge_parts(str(parts_copy))


def test_a_worker_refuses_a_cache_split_another_way(parts_copy, tiny_model_dir, tiny_jsonl):
    config = load_config(None, config_args(tiny_model_dir, tiny_jsonl, parts_copy))
    with pytest.raises(ValueError, match="run with 2 workers, this run has 3: use --num-workers 2"):
        run_worker(teacher_job(config), WorkerSpec(0, 3))


# --- kill and resume one worker (a hard kill right after its second shard: stages/common/failpoints.py) --
def test_killed_worker_redoes_only_its_own_missing_shards(tiny_model_dir, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: " + "def f(x): return x * %d " % i * 4}) + "\n" for i in range(96)))
    args = config_args(tiny_model_dir, data, tmp_path / "two", "cache.batch_tokens=256", "data.max_length=96")
    reference, cache = tmp_path / "one", tmp_path / "two"
    run_cache_teacher(load_config(None, [*args, f"cache.dir={reference}"]))  # 12 shards of 8
    assert run_worker(teacher_job(load_config(None, args)), WorkerSpec(0, 2)).shards_written_now == 6  # shards 0, 2, ..., 10
    worker = ["cache-teacher", "--config", "", *args, "--num-workers", "2", "--worker-rank", "1"]
    killed = cli(*worker, env={**os.environ, FAILPOINT_ENV: "after_shard_published:3"})  # worker 1's second shard
    _, err = killed.communicate()
    assert killed.returncode == -signal.SIGKILL, err[-3000:]
    part = json.loads((cache / "parts" / "worker-00001-of-00002.json").read_text())
    assert [r["index"] for r in part["shards"]] == [1, 3] and not part["complete"]
    mine = [f"shard-{i:05d}.parquet" for i in (1, 3)]
    assert sorted(p.name for p in cache.glob("shard-*")) == sorted([f"shard-{i:05d}.parquet" for i in range(0, 12, 2)] + mine)
    assert not (cache / "manifest.json").exists() and not list(cache.glob("*.tmp"))  # no merge, nothing half-written
    with pytest.raises(MergeError, match=r"worker 1 .* has not finished: shard\(s\) \[5, 7, 9, 11\] missing"):
        merge_parts(str(cache))
    before = files_state(cache.glob("shard-*"))  # worker 0's six and worker 1's two
    resumed = cli(*worker, env={k: v for k, v in os.environ.items() if k != FAILPOINT_ENV})
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err[-3000:]
    assert "6 shards assigned, 4 written now" in out and "merged manifest: 12 shards, 96 examples" in out
    assert files_state(Path(p) for p in before) == before  # nobody else's shard, nor its own two, was rewritten
    assert_same_cache(cache, reference)


# --- torchrun: rank and size from RANK / WORLD_SIZE ----------------------------------------------
@pytest.mark.slow
def test_torchrun_launches_the_workers(two_worker_cache, tiny_model_dir, tiny_jsonl, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(port), "-m", "pipeline", "cache-teacher", "--config", "",
               *config_args(tiny_model_dir, tiny_jsonl, tmp_path / "torchrun")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "worker 0 of 2" in result.stdout and "worker 1 of 2" in result.stdout
    assert_same_cache(tmp_path / "torchrun", two_worker_cache[1])
