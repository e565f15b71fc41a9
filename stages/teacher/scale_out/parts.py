"""Who a stage-one worker is and where it records its shards: worker specs, the shard assignment,
and manifest parts (one per worker, `parts/worker-RRRRR-of-NNNNN.json`; with one worker, the part
is manifest.json itself). Read by the workers (stages/teacher/scale_out/workers.py) and the merge
(stages/teacher/scale_out/merge.py).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from stages.teacher.settings import CacheConfig
from storage_schemas import MANIFEST_NAME, Manifest
from storage_schemas.remote import CacheStore, default_local_dir

__all__ = ["WorkerSpec", "ManifestPart", "resolve_worker", "assigned_shards", "part_name", "parse_part_name",
           "local_working_dir", "read_parts", "PARTS_DIR"]

PARTS_DIR = "parts"
_PART_RE = re.compile(rf"^{PARTS_DIR}/worker-(\d{{5}})-of-(\d{{5}})\.json$")
# --- who am I ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    size: int
    source: str = "flags"      # flags | slurm | torchrun | single

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"worker rank {self.rank} of {self.size} ({self.source}): need 0 <= rank < num_workers")


def _from_env(env) -> tuple[int, int, str] | None:
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))  # --array=1-4 numbers tasks from 1
        return int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]), "slurm"
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun"
    return None


def resolve_worker(num_workers: int | None = None, worker_rank: int | None = None, env=None) -> WorkerSpec:
    """This process's worker rank and the worker count: flags first, then the launcher's variables."""
    env = os.environ if env is None else env
    found = _from_env(env)
    if num_workers is None and worker_rank is None:
        return WorkerSpec(*found) if found else WorkerSpec(0, 1, "single")
    size = num_workers if num_workers is not None else (found[1] if found else None)
    rank = worker_rank if worker_rank is not None else (found[0] if found and found[1] == size else None)
    if size is None:
        raise ValueError("--worker-rank needs --num-workers (or SLURM_ARRAY_TASK_COUNT / WORLD_SIZE)")
    if rank is None:
        raise ValueError(f"--num-workers {size}: which worker is this? pass --worker-rank, or run under a "
                         "Slurm array or torchrun")
    return WorkerSpec(rank, size, "flags")


def assigned_shards(num_shards: int, worker: WorkerSpec) -> list[int]:
    """Shard i belongs to worker i mod N: balanced, and independent of anything but i and N."""
    return list(range(worker.rank, num_shards, worker.size))


def part_name(rank: int, size: int) -> str:
    """Where worker `rank` of `size` records its shards. One worker (a single-process run) records
    them in manifest.json itself: its part is the whole cache's manifest."""
    return MANIFEST_NAME if size == 1 else f"{PARTS_DIR}/worker-{rank:05d}-of-{size:05d}.json"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(rank, size) of a part object name, None for anything else (e.g. a temp object)."""
    match = _PART_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def local_working_dir(cache: CacheConfig) -> Path:
    """Where shard files are written: the cache itself, or for a remote cache its local copy."""
    store = CacheStore.open(cache.dir)
    if not store.remote:
        return Path(store.root)
    return Path(cache.local_dir) if cache.local_dir else default_local_dir(cache.dir)


# --- the manifest part ---------------------------------------------------------------------------
@dataclass
class ManifestPart(Manifest):
    """One worker's manifest: the shards it wrote. `complete` = all of its assigned shards are in."""

    worker_rank: int = 0
    num_workers: int = 1
    writer: str = ""           # host:pid of the process that last wrote this part (who to look for)

    def attach(self, store: CacheStore, published: set[str]) -> "ManifestPart":
        self._store, self._published = store, set(published)  # not dataclass fields: never serialized
        return self

    def save(self, cache_dir: str | os.PathLike) -> None:
        """Publish new shards (remote caches), then the part: called by stage one after each shard."""
        if self._store.remote:
            for record in self.shards:
                if record.file not in self._published:
                    self._store.put_file(Path(cache_dir) / record.file, record.file)
                    self._published.add(record.file)
        self._store.write_text(part_name(self.worker_rank, self.num_workers), self.to_json())

    @classmethod
    def read(cls, store: CacheStore, name: str) -> "ManifestPart":
        try:
            raw = json.loads(store.read_text(name))
        except json.JSONDecodeError as err:
            raise ValueError(f"{store.where(name)}: not valid JSON ({err})") from err
        return cls.from_dict(raw, where=store.where(name))


def read_parts(store: CacheStore) -> dict[str, ManifestPart]:
    """Every manifest part in the cache, by object name."""
    return {name: ManifestPart.read(store, name) for name in store.list(PARTS_DIR) if parse_part_name(name)}
