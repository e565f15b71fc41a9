"""Stage one on Ray: the same worker function as Ray tasks, one per GPU (or CPU slot), then merge.

    python -m pipeline cache-teacher --config C --launcher ray --num-workers 8 --ray-address auto
    python -m pipeline cache-teacher --config C --launcher ray --num-workers 2     # local Ray instance

Each task runs `run_worker` for one rank (stages/teacher/scale_out/workers.py), so it writes the same shard
files and manifest part as a Slurm or torchrun worker would. A task whose process dies (node lost,
OOM-killed) or that raises is retried up to `max_retries` times; the retry resumes from the
worker's part, so only the shards that were not yet published are redone. The driver then merges
the parts (stages/teacher/scale_out/merge.py). On an existing cluster every node needs this package
installed and the model, data and cache.dir reachable under the same paths (or a remote cache.dir).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from stages.teacher.scale_out.merge import merge_parts
from stages.teacher.scale_out.parts import WorkerSpec
from stages.teacher.scale_out.workers import WorkerResult, run_worker
from stages.teacher.stage_one import TeacherJob
from storage_schemas import Manifest
from storage_schemas.remote import is_remote

__all__ = ["run_with_ray"]

_REPO_ROOT = str(Path(__file__).resolve().parents[3])


def _absolute(job: TeacherJob) -> TeacherJob:
    """Local paths made absolute: Ray workers do not start in the driver's directory."""
    def resolve(path: str) -> str:
        return path if not path or is_remote(path) else str(Path(path).resolve())

    cache = dataclasses.replace(job.cache, dir=resolve(job.cache.dir), local_dir=resolve(job.cache.local_dir))
    data = dataclasses.replace(job.data, path=resolve(job.data.path))
    model = resolve(job.model) if Path(job.model).exists() else job.model
    return dataclasses.replace(job, model=model, data=data, cache=cache)


def _ray_worker(job: TeacherJob, rank: int, size: int) -> WorkerResult:
    """One worker, inside a Ray task; the driver merges once all have returned."""
    return run_worker(job, WorkerSpec(rank, size, "ray"), merge=False)


def _connect(address: str | None):
    import ray

    # Local instance: workers import this package from the repository checkout.
    path = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "HF_HOME", "HF_DATASETS_CACHE", "MTCACHE_HOME",
                 "MTCACHE_FAILPOINT"):  # the last: tests kill a task at a chosen shard (stages/common/failpoints.py)
        if name in os.environ:
            env[name] = os.environ[name]
    ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False,
             configure_logging=False, log_to_driver=True)
    return ray


def run_with_ray(job: TeacherJob, num_workers: int | None, address: str | None = None,
                 max_retries: int = 3) -> tuple[list[WorkerResult], Manifest]:
    """Run `num_workers` workers as Ray tasks (default: one per GPU in the cluster), then merge: each
    rank's result (of the attempt that finished) and the merged manifest."""
    ray = _connect(address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        per_worker_gpus = job.cache.tensor_parallel_size * job.cache.pipeline_parallel_size if gpus else 0
        num_workers = num_workers or (gpus // max(per_worker_gpus, 1) if gpus else None)
        if not num_workers:
            raise ValueError("--launcher ray: the cluster has no GPUs; pass --num-workers N")
        task = ray.remote(_ray_worker).options(num_cpus=1, num_gpus=per_worker_gpus, max_retries=max_retries,
                                               retry_exceptions=True)
        job = _absolute(job)
        workers = ray.get([task.remote(job, rank, num_workers) for rank in range(num_workers)])
    finally:
        ray.shutdown()
    return workers, merge_parts(job.cache.dir)
