"""Data-parallel stage one: N workers each score the shards assigned to them, then merge.

    python -m pipeline cache-teacher --config C --num-workers 4 --worker-rank 2   # one worker
    sbatch --array=0-3 run.sh     # each task: python -m pipeline cache-teacher --config C
    torchrun --nproc_per_node 4 -m pipeline cache-teacher --config C
    python -m pipeline merge-manifest CACHE        # only needed if the automatic merge did not run

Assignment: shard i holds examples [i * rows_per_shard, (i + 1) * rows_per_shard) — fixed by the
data and the settings, never by N — and belongs to worker i mod N. So every worker writes exactly
the shard files a single process would write, byte for byte, plus its own manifest part
`parts/worker-RRRRR-of-NNNNN.json` (a manifest listing only its shards, rewritten atomically after
each one). A killed worker resumes from its part. The worker that finds every part complete
merges them into `manifest.json` (stages/scale_out/merge.py); until then the cache has no
manifest and no reader will open it.

Rank and size come from --worker-rank/--num-workers, else a Slurm array
(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT), else torchrun (RANK,
WORLD_SIZE). A remote cache (cache.dir = s3://...) is written through a local working copy
(`cache.local_dir`): each shard is published as soon as it is written, then the part listing it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Config, save_config
from pipeline.data import Example, InputReport
from stages.cache_teacher import _open_engine, _write_shards, load_examples, plan_manifest
from storage_schemas import MANIFEST_NAME, FingerprintMismatch, Manifest, shard_file_name
from storage_schemas.remote import CacheStore, default_local_dir

__all__ = ["WorkerSpec", "ManifestPart", "resolve_worker", "assigned_shards", "part_name", "parse_part_name",
           "local_working_dir", "run_worker", "WorkerSummary", "PARTS_DIR"]

PARTS_DIR = "parts"
_PART_RE = re.compile(rf"^{PARTS_DIR}/worker-(\d{{5}})-of-(\d{{5}})\.json$")
# torchrun's rendezvous variables: vLLM sets up its own torch.distributed group inside each worker
# and must not see the launcher's.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


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
    return f"{PARTS_DIR}/worker-{rank:05d}-of-{size:05d}.json"


def parse_part_name(name: str) -> tuple[int, int] | None:
    """(rank, size) of a part object name, None for anything else (e.g. a temp object)."""
    match = _PART_RE.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def local_working_dir(config: Config) -> Path:
    """Where shard files are written: the cache itself, or for a remote cache its local copy."""
    store = CacheStore.open(config.cache.dir)
    if not store.remote:
        return Path(store.root)
    return Path(config.cache.local_dir) if config.cache.local_dir else default_local_dir(config.cache.dir)


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
        import json

        try:
            raw = json.loads(store.read_text(name))
        except json.JSONDecodeError as err:
            raise ValueError(f"{store.where(name)}: not valid JSON ({err})") from err
        return cls.from_dict(raw, where=store.where(name))


def read_parts(store: CacheStore) -> dict[str, ManifestPart]:
    """Every manifest part in the cache, by object name."""
    return {name: ManifestPart.read(store, name) for name in store.list(PARTS_DIR) if parse_part_name(name)}


# --- opening a cache as worker r -----------------------------------------------------------------
def _merged(store: CacheStore, planned: Manifest) -> Manifest | None:
    """The complete manifest of this same cache if it already exists (nothing left to do), else None."""
    if not store.exists(MANIFEST_NAME):
        return None
    import json

    existing = Manifest.from_dict(json.loads(store.read_text(MANIFEST_NAME)), where=store.where(MANIFEST_NAME))
    _same_origin(existing, planned, store.where(MANIFEST_NAME))
    if not existing.complete:
        raise FileExistsError(f"{store.where(MANIFEST_NAME)}: an unfinished single-process stage one is in this cache; "
                              "resume it without --num-workers, or start over in an empty cache.dir")
    return existing


def _same_origin(existing: Manifest, planned: Manifest, where: str) -> None:
    try:
        existing.check_same_origin(planned)
    except FingerprintMismatch as err:
        raise FingerprintMismatch(f"{where} belongs to a cache of something else: {err}. "
                                  "Use another cache.dir, or --overwrite to replace it.") from None


def _open_part(store: CacheStore, planned: Manifest, worker: WorkerSpec) -> ManifestPart:
    """This worker's part (resumed if it exists), after checking every other part is compatible."""
    mine = part_name(worker.rank, worker.size)
    for name, part in read_parts(store).items():
        if part.num_workers != worker.size:
            raise ValueError(f"{store.where(name)} was written by a run with {part.num_workers} workers, this run "
                             f"has {worker.size}: use --num-workers {part.num_workers}, or an empty cache.dir")
        _same_origin(part, planned, store.where(name))
        if name == mine:
            part.writer = _writer()
            return part.attach(store, {r.file for r in part.shards})
    fields = {f.name: getattr(planned, f.name) for f in dataclasses.fields(Manifest)}
    return ManifestPart(**fields, worker_rank=worker.rank, num_workers=worker.size, writer=_writer()).attach(store, set())


def _writer() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def _tokenized(config: Config) -> tuple[list[Example], InputReport]:
    """The whole dataset, tokenized and checked (as run_cache_teacher does): shard boundaries and
    the dataset fingerprint depend on every example, so each worker sees them all."""
    return load_examples(config)


def _pin_device(worker: WorkerSpec, config: Config) -> None:
    """Under torchrun: GPUs [LOCAL_RANK * g, (LOCAL_RANK + 1) * g) for a worker using g = tp * pp GPUs
    (unless CUDA_VISIBLE_DEVICES is set), and hide torchrun's variables from vLLM."""
    if worker.source != "torchrun":
        return
    local_rank = os.environ.get("LOCAL_RANK")
    per_worker = config.cache.tensor_parallel_size * config.cache.pipeline_parallel_size
    if local_rank is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        first = int(local_rank) * per_worker
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(per_worker))
    for name in _TORCHRUN_VARS:
        os.environ.pop(name, None)


# --- the worker ----------------------------------------------------------------------------------
@dataclass
class WorkerSummary:
    rank: int
    size: int
    shards_assigned: int
    shards_written_now: int
    tokens_written_now: int
    tokens_per_second: float    # this worker's teacher pass incl. top-k and writing; engine start excluded
    merged: Manifest | None     # set by the worker that completed the cache (or found it complete)
    source: str = "flags"       # where rank and size came from: flags | slurm | torchrun | ray | single

    def render(self) -> str:
        lines = [f"worker {self.rank} of {self.size} ({self.source}): {self.shards_assigned} shards assigned, "
                 f"{self.shards_written_now} written now"
                 + (f", {self.tokens_written_now:,} tokens at {self.tokens_per_second:,.0f} tok/s" if self.shards_written_now else "")]
        if self.merged is not None:
            m = self.merged
            lines.append(f"merged manifest: {len(m.shards)} shards, {m.num_rows:,} examples, {m.num_tokens:,} tokens, "
                         f"{m.num_bytes / 2**20:.2f} MiB (complete={m.complete})")
        else:
            lines.append("other workers still running: the last one to finish merges the parts "
                         "(or run `python -m pipeline merge-manifest CACHE`)")
        return "\n".join(lines)


def run_worker(config: Config, worker: WorkerSpec, merge: bool = True) -> WorkerSummary:
    """Score and write this worker's shards (resuming its part), then merge if every part is complete."""
    from stages.scale_out.merge import try_merge

    _pin_device(worker, config)
    examples, report = _tokenized(config)
    store, local = CacheStore.open(config.cache.dir), local_working_dir(config)
    planned = plan_manifest(config, len(examples), report)
    num_shards = math.ceil(len(examples) / config.cache.rows_per_shard)
    mine = assigned_shards(num_shards, worker)
    if (done := _merged(store, planned)) is not None:
        return WorkerSummary(worker.rank, worker.size, len(mine), 0, 0, 0.0, done, worker.source)
    part = _open_part(store, planned, worker)
    local.mkdir(parents=True, exist_ok=True)
    for index in mine:  # this worker's half-written shards from a killed attempt; never another's
        (local / f"{shard_file_name(index)}.tmp").unlink(missing_ok=True)  # write_shard's temp name
    if worker.rank == 0:
        _save_config(config, store, local)
    todo = [i for i in mine if part.shard(i) is None]
    tokens, seconds = 0, 0.0
    if todo:
        local_config = dataclasses.replace(config, cache=dataclasses.replace(config.cache, dir=str(local)))
        engine = _open_engine(local_config)
        try:
            tokens, seconds = _write_shards(engine, local_config, examples, todo, part)
        finally:
            engine.close()
    part.complete = all(part.shard(i) is not None for i in mine)
    part.save(local)  # before looking at the others: of two workers finishing together, one sees both complete
    merged = try_merge(store) if merge else None
    return WorkerSummary(worker.rank, worker.size, len(mine), len(todo), tokens, tokens / seconds if tokens else 0.0,
                         merged, worker.source)


def _save_config(config: Config, store: CacheStore, local: Path) -> None:
    """config.yaml beside the shards, as a single-process run writes it (worker 0 only)."""
    save_config(config, local / "config.yaml")
    if store.remote:
        store.put_file(local / "config.yaml", "config.yaml")
