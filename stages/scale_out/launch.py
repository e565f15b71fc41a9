"""`cache-teacher` as one of N workers, or as the driver of all N on Ray (wired by pipeline/cli.py).

    python -m pipeline cache-teacher --config C --num-workers 2 --worker-rank 0     # this process: worker 0
    python -m pipeline cache-teacher --config C --launcher ray --num-workers 2      # Ray runs both, then merges
"""
from __future__ import annotations

import shutil

from stages.scale_out.parts import local_working_dir, resolve_worker
from stages.scale_out.ray_launcher import run_with_ray
from stages.scale_out.workers import run_worker
from stages.settings import StageConfig
from storage_schemas.remote import CacheStore

__all__ = ["run_scaled_stage_one", "clear_cache"]


def clear_cache(config: StageConfig) -> None:
    """--overwrite: empty the cache (and a remote cache's local working copy)."""
    store = CacheStore.open(config.cache.dir)
    store.fs.delete_dir_contents(store.root, missing_dir_ok=True)
    if store.remote:
        shutil.rmtree(local_working_dir(config), ignore_errors=True)


def run_scaled_stage_one(config: StageConfig, launcher: str, num_workers: int | None, worker_rank: int | None,
                         ray_address: str | None, overwrite: bool = False) -> str:
    """Run stage one as configured; returns the summary text."""
    if launcher == "ray":
        if worker_rank is not None:
            raise ValueError("--worker-rank: the Ray launcher runs every worker itself; drop it")
        if overwrite:
            clear_cache(config)
        return run_with_ray(config, num_workers, ray_address).render()
    worker = resolve_worker(num_workers, worker_rank)
    if overwrite:
        if worker.size > 1:
            raise ValueError("--overwrite with several workers would delete the other workers' shards; "
                             "empty cache.dir once before starting them (or use --launcher ray --overwrite)")
        clear_cache(config)
    return run_worker(config, worker).render()
