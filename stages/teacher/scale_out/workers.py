"""Data-parallel stage one: N workers each score the shards assigned to them, then merge. A
single-process run is worker 0 of 1 (stages/teacher/runner.py decides which, in one place).

    python -m pipeline cache-teacher --config C --num-workers 4 --worker-rank 2   # one worker
    sbatch --array=0-3 run.sh     # each task: python -m pipeline cache-teacher --config C
    torchrun --nproc_per_node 4 -m pipeline cache-teacher --config C
    python -m pipeline merge-manifest CACHE        # only needed if the automatic merge did not run

Assignment: shard i holds examples [i * rows_per_shard, (i + 1) * rows_per_shard) — fixed by the
data and the settings, never by N — and belongs to worker i mod N. So every worker writes exactly
the shard files a single process would write, byte for byte, plus its own manifest part
`parts/worker-RRRRR-of-NNNNN.json` (a manifest listing only its shards, rewritten atomically after
each one). A killed worker resumes from its part. The worker that finds every part complete
merges them into `manifest.json` (stages/teacher/scale_out/merge.py); until then the cache has no
manifest and no reader will open it.

Rank and size come from --worker-rank/--num-workers, else a Slurm array
(SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, SLURM_ARRAY_TASK_COUNT), else torchrun (RANK,
WORLD_SIZE). A remote cache (cache.dir = s3://...) is written through a local working copy
(`cache.local_dir`): each shard is published as soon as it is written, then the part listing it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from stages.teacher.scale_out.merge import finish_manifest, try_merge
from stages.teacher.scale_out.parts import (
    ManifestPart,
    WorkerSpec,
    assigned_shards,
    local_working_dir,
    part_name,
    read_parts,
)
from stages.teacher.stage_one import TeacherJob, load_examples, open_teacher_engine, plan_manifest, write_shards
from storage_schemas import MANIFEST_NAME, FingerprintMismatch, Manifest, shard_file_name
from storage_schemas.remote import CacheStore

__all__ = ["run_worker", "WorkerResult", "CONFIG_NAME"]

CONFIG_NAME = "config.yaml"  # the resolved config, beside the shards (written by worker 0)

# torchrun's rendezvous variables: vLLM sets up its own torch.distributed group inside each worker
# and must not see the launcher's.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


# --- opening a cache as worker r -----------------------------------------------------------------
def _merged(store: CacheStore, planned: Manifest) -> Manifest | None:
    """Several workers: the complete manifest of this same cache if it already exists (nothing left
    to do), else None."""
    if not store.exists(MANIFEST_NAME):
        return None
    existing = Manifest.from_dict(json.loads(store.read_text(MANIFEST_NAME)), where=store.where(MANIFEST_NAME))
    _same_origin(existing, planned, store.where(MANIFEST_NAME))
    if not existing.complete:
        raise FileExistsError(f"{store.where(MANIFEST_NAME)}: an unfinished single-process stage one is in this cache; "
                              "resume it without --num-workers, or start over in an empty cache.dir")
    return existing


# The manifest's settings fields that are config keys: a cache written with other settings resumes with them.
_SETTING_KEYS = {"settings.k": "cache.k", "settings.encoding": "cache.encoding", "settings.max_length": "data.max_length",
                 "settings.rows_per_shard": "cache.rows_per_shard", "settings.zstd_level": "cache.zstd_level"}


def _same_origin(existing: Manifest, planned: Manifest, where: str) -> None:
    try:
        existing.check_same_origin(planned)
    except FingerprintMismatch as err:
        differences = existing.identity_differences(planned)
        resume = ""
        if all(name in _SETTING_KEYS for name, _, _ in differences):  # only settings: the same cache, other defaults
            resume = (" To resume or extend this cache, pass its settings: "
                      + " ".join(f"{_SETTING_KEYS[name]}={mine}" for name, mine, _ in differences) + ".")
        raise FingerprintMismatch(f"{where} belongs to a cache of something else: {err}.{resume} "
                                  "Or use another cache.dir, or --overwrite to replace it.") from None


def _existing_parts(store: CacheStore, worker: WorkerSpec) -> dict[str, ManifestPart]:
    """Every part already in the cache (for one worker: its manifest.json, if any), by name."""
    parts = read_parts(store)
    if worker.size == 1 and store.exists(MANIFEST_NAME):
        parts[MANIFEST_NAME] = ManifestPart.read(store, MANIFEST_NAME)
    elif worker.size == 1 and not parts and any(n.rsplit("/", 1)[-1].startswith("shard-") for n in store.list("")):
        raise FileExistsError(f"{store.uri}: holds shards but no manifest; use --overwrite to start over")
    return parts


def _open_part(store: CacheStore, planned: Manifest, worker: WorkerSpec) -> ManifestPart:
    """This worker's part (resumed if it exists), after checking every other part is compatible."""
    mine = part_name(worker.rank, worker.size)
    for name, part in _existing_parts(store, worker).items():
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
    return f"{socket.gethostname()}:{os.getpid()}"


def _clear_leftovers(local: Path, worker: WorkerSpec, shards: list[int]) -> None:
    """A killed attempt's half-written files: this worker's shards' temp files, never another's;
    one worker owns the whole directory, so every temp file there is its own."""
    for index in shards:
        (local / f"{shard_file_name(index)}.tmp").unlink(missing_ok=True)  # write_shard's temp name
    if worker.size == 1:
        for leftover in [*local.glob("*.tmp"), *local.glob("*.tmp-*")]:
            leftover.unlink()


def _pin_device(worker: WorkerSpec, job: TeacherJob) -> None:
    """Under torchrun: GPUs [LOCAL_RANK * g, (LOCAL_RANK + 1) * g) for a worker using g = tp * pp GPUs
    (unless CUDA_VISIBLE_DEVICES is set), and hide torchrun's variables from vLLM."""
    if worker.source != "torchrun":
        return
    local_rank = os.environ.get("LOCAL_RANK")
    per_worker = job.cache.tensor_parallel_size * job.cache.pipeline_parallel_size
    if local_rank is not None and "CUDA_VISIBLE_DEVICES" not in os.environ:
        first = int(local_rank) * per_worker
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(per_worker))
    for name in _TORCHRUN_VARS:
        os.environ.pop(name, None)


# --- the worker ----------------------------------------------------------------------------------
@dataclass
class WorkerResult:
    """What one worker did (the runner's `StageOneSummary` renders one or several of these)."""

    rank: int
    size: int
    shards_assigned: int
    shards_written_now: int
    tokens_written_now: int
    tokens_per_second: float    # this worker's teacher pass incl. top-k and writing; engine start excluded
    merged: Manifest | None     # set by the worker that completed the cache (or found it complete)
    source: str = "flags"       # where rank and size came from: flags | slurm | torchrun | ray | single


def run_worker(job: TeacherJob, worker: WorkerSpec, merge: bool = True, engine=None) -> WorkerResult:
    """Score and write this worker's shards (resuming its part), then merge if every part is complete.

    One worker (a single-process run) is the same path with N = 1: its part is manifest.json, and
    finishing it completes the cache. Worker 0 saves `job.config_text` as config.yaml once the
    cache is known to be this job's. `engine`: an already open engine to use
    (the caller closes it) instead of opening one from `job.cache`."""
    _pin_device(worker, job)
    examples, report = load_examples(job)  # every worker sees all: shard bounds and fingerprints need them
    store, local = CacheStore.open(job.cache.dir), local_working_dir(job.cache)
    planned = plan_manifest(job, len(examples), report)
    mine = assigned_shards(math.ceil(len(examples) / job.cache.rows_per_shard), worker)
    if worker.size > 1 and (done := _merged(store, planned)) is not None:
        return WorkerResult(worker.rank, worker.size, len(mine), 0, 0, 0.0, done, worker.source)
    part = _open_part(store, planned, worker)
    local.mkdir(parents=True, exist_ok=True)
    _clear_leftovers(local, worker, mine)
    if worker.rank == 0:
        _save_config(job.config_text, store, local)
    todo = [i for i in mine if part.shard(i) is None]
    if part.shards and todo:  # a rerun says at its start what it keeps
        tqdm.write(f"resuming {job.cache.dir}: keeping {len(mine) - len(todo)} finished shard(s) of {len(mine)}, "
                   f"computing {len(todo)}")
    if todo and not part.shards:
        # Saved before the first shard: a kill between that shard's rename and the first manifest save
        # then leaves a manifest listing nothing, and the rerun resumes (an unlisted shard file is
        # rewritten) instead of finding shards with no manifest.
        part.save(local)
    tokens, seconds = _score_todo(job.with_cache_dir(str(local)), examples, todo, part, engine) if todo else (0, 0.0)
    part.complete = all(part.shard(i) is not None for i in mine)
    part.save(local)  # before looking at the others: of two workers finishing together, one sees both complete
    if worker.size == 1:  # its part is manifest.json: completing it is the merge
        merged = finish_manifest(store, part, part.shards, part.created_at)
    else:
        merged = try_merge(store) if merge else None
    return WorkerResult(worker.rank, worker.size, len(mine), len(todo), tokens, tokens / seconds if tokens else 0.0,
                        merged, worker.source)


def _score_todo(local_job: TeacherJob, examples, todo: list[int], part: ManifestPart, engine) -> tuple[int, float]:
    """write_shards into the local working directory, on `engine` or on one opened (and closed) here."""
    if engine is not None:
        return write_shards(engine, local_job, examples, todo, part)
    engine = open_teacher_engine(local_job)
    try:
        return write_shards(engine, local_job, examples, todo, part)
    finally:
        engine.close()


def _save_config(config_text: str, store: CacheStore, local: Path) -> None:
    """config.yaml beside the shards (worker 0 only); published too for a remote cache."""
    (local / CONFIG_NAME).write_text(config_text)
    if store.remote:
        store.put_file(local / CONFIG_NAME, CONFIG_NAME)
