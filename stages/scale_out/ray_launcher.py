"""Stage one on Ray: the same worker function as Ray tasks, one per GPU (or CPU slot), then merge.

    python -m pipeline cache-teacher --config C --launcher ray --num-workers 8 --ray-address auto
    python -m pipeline cache-teacher --config C --launcher ray --num-workers 2     # local Ray instance

Each task runs `run_worker` for one rank (stages/scale_out/workers.py), so it writes the same shard
files and manifest part as a Slurm or torchrun worker would. A task whose process dies (node lost,
OOM-killed) or that raises is retried up to `max_retries` times; the retry resumes from the
worker's part, so only the shards that were not yet published are redone. The driver then merges
the parts (stages/scale_out/merge.py). On an existing cluster every node needs this package
installed and the model, data and cache.dir reachable under the same paths (or a remote cache.dir).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from stages.scale_out.merge import merge_parts
from stages.scale_out.parts import WorkerSpec
from stages.scale_out.workers import run_worker
from stages.settings import StageConfig
from storage_schemas.remote import is_remote

__all__ = ["run_with_ray", "RaySummary"]

_REPO_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class RaySummary:
    workers: list            # WorkerSummary per rank (of the attempt that finished)
    manifest: object         # the merged Manifest

    def render(self) -> str:
        m = self.manifest
        lines = [w.render().splitlines()[0] for w in self.workers]
        total = sum(w.tokens_written_now for w in self.workers)
        lines.append(f"ray: {len(self.workers)} workers, {total:,} tokens written now, per-worker tok/s "
                     + ", ".join(f"{w.tokens_per_second:,.0f}" for w in self.workers))
        lines.append(f"merged manifest: {len(m.shards)} shards, {m.num_rows:,} examples, {m.num_tokens:,} tokens, "
                     f"{m.num_bytes / 2**20:.2f} MiB (complete={m.complete})")
        return "\n".join(lines)


def _absolute(config: StageConfig) -> StageConfig:
    """Local paths made absolute: Ray workers do not start in the driver's directory."""
    def resolve(path: str) -> str:
        return path if not path or is_remote(path) else str(Path(path).resolve())

    cache = dataclasses.replace(config.cache, dir=resolve(config.cache.dir), local_dir=resolve(config.cache.local_dir))
    data = dataclasses.replace(config.data, path=resolve(config.data.path))
    model = resolve(config.model) if Path(config.model).exists() else config.model
    return dataclasses.replace(config, model=model, data=data, cache=cache)


def _ray_worker(config: StageConfig, rank: int, size: int):
    """One worker, inside a Ray task; the driver merges once all have returned."""
    return run_worker(config, WorkerSpec(rank, size, "ray"), merge=False)


def _connect(address: str | None):
    import ray

    # Local instance: workers import this package from the repository checkout.
    path = os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    for name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_LOGGING_LEVEL", "HF_HOME", "HF_DATASETS_CACHE", "MTCACHE_HOME",
                 "MTCACHE_FAILPOINT"):  # the last: tests kill a task at a chosen shard (stages/failpoints.py)
        if name in os.environ:
            env[name] = os.environ[name]
    ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False,
             configure_logging=False, log_to_driver=True)
    return ray


def run_with_ray(config: StageConfig, num_workers: int | None, address: str | None = None,
                 max_retries: int = 3) -> RaySummary:
    """Run `num_workers` workers as Ray tasks (default: one per GPU in the cluster), then merge."""
    ray = _connect(address)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        per_worker_gpus = config.cache.tensor_parallel_size * config.cache.pipeline_parallel_size if gpus else 0
        num_workers = num_workers or (gpus // max(per_worker_gpus, 1) if gpus else None)
        if not num_workers:
            raise ValueError("--launcher ray: the cluster has no GPUs; pass --num-workers N")
        task = ray.remote(_ray_worker).options(num_cpus=1, num_gpus=per_worker_gpus, max_retries=max_retries,
                                               retry_exceptions=True)
        config = _absolute(config)
        workers = ray.get([task.remote(config, rank, num_workers) for rank in range(num_workers)])
    finally:
        ray.shutdown()
    return RaySummary(workers, merge_parts(config.cache.dir))
