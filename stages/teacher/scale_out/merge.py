"""Join the workers' manifest parts into the cache's `manifest.json`.

    python -m pipeline merge-manifest CACHE      (CACHE: a directory or a URI such as s3://bucket/c)

Run automatically by the worker that completes last (stages/teacher/scale_out/workers.py); by hand after
a Slurm array, or to see why a cache is not complete. Refuses, naming the part or shard:
- parts written with different worker counts, or a worker's part that is missing;
- parts of different teachers, tokenizers, data or settings;
- a part whose worker has not finished its shards;
- a shard listed by two parts (overlap), by a worker it does not belong to, or by no part (gap);
- a listed shard object that is missing or has another size than its record.

`finish_manifest` is the one place a cache's manifest.json is completed: by this merge, and by a
single-process run (worker 0 of 1, whose part is manifest.json itself).

The merged manifest lists the shards in index order with the records the workers wrote, so it
matches a single-process run's manifest in everything but its creation time. Checksums are
verified by `verify` (and by stage two on open), not here: merging stays cheap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

from stages.teacher.scale_out.parts import ManifestPart, WorkerSpec, assigned_shards, parse_part_name, read_parts
from storage_schemas import MANIFEST_NAME, FingerprintMismatch, Manifest, ShardRecord
from storage_schemas.remote import CacheStore

__all__ = ["MergeError", "check_parts", "merge_parts", "try_merge", "finish_manifest"]


class MergeError(ValueError):
    """The manifest parts do not add up to one complete cache."""


def _check_workers(parts: dict[str, ManifestPart], where: str) -> int:
    """The common worker count; every rank 0..N-1 must have its part."""
    sizes = {name: parse_part_name(name)[1] for name in parts}
    if len(set(sizes.values())) > 1:
        raise MergeError(f"{where}: parts were written with different worker counts: "
                         + ", ".join(f"{n} ({s} workers)" for n, s in sorted(sizes.items())))
    size = next(iter(sizes.values()))
    present = {parse_part_name(name)[0] for name in parts}
    missing = sorted(set(range(size)) - present)
    if missing:
        raise MergeError(f"{where}: no part from worker(s) {missing} of {size}; run them "
                         f"(--num-workers {size} --worker-rank R) before merging")
    return size


def _check_origin(parts: dict[str, ManifestPart], where: str) -> None:
    (first_name, first), *rest = sorted(parts.items())
    for name, part in rest:
        try:
            first.check_same_origin(part)
        except FingerprintMismatch as err:
            raise MergeError(f"{where}: {name} and {first_name} are parts of different caches: {err}") from None


def _collect_shards(parts: dict[str, ManifestPart], size: int, num_shards: int, where: str) -> list[ShardRecord]:
    """Every shard once, checked against the assignment rule; incomplete workers named."""
    owner: dict[int, str] = {}
    for name, part in sorted(parts.items()):
        rank = parse_part_name(name)[0]
        for record in part.shards:
            if record.index in owner:
                raise MergeError(f"{where}: shard {record.index} is listed by both {owner[record.index]} and {name} (overlapping parts)")
            if record.index % size != rank or record.index >= num_shards:
                raise MergeError(f"{where}: {name} lists shard {record.index}, which is not worker {rank}'s "
                                 f"(shard i belongs to worker i mod {size}; {num_shards} shards in all)")
            owner[record.index] = name
        todo = [i for i in assigned_shards(num_shards, WorkerSpec(rank, size)) if i not in owner]
        if todo:
            raise MergeError(f"{where}: worker {rank} ({name}) has not finished: shard(s) {todo[:10]}"
                             f"{' ...' if len(todo) > 10 else ''} missing; re-run it to resume")
    return sorted((r for p in parts.values() for r in p.shards), key=lambda r: r.index)


def check_parts(store: CacheStore, parts: dict[str, ManifestPart]) -> list[ShardRecord]:
    """The merged shard list, or MergeError naming what is wrong (see module docstring)."""
    where = store.uri
    if not parts:
        raise MergeError(f"{where}: no manifest parts under {store.where('parts/')}; nothing to merge")
    size = _check_workers(parts, where)
    _check_origin(parts, where)
    first = next(iter(parts.values()))
    num_shards = math.ceil(first.dataset.num_examples / first.settings.rows_per_shard)
    shards = _collect_shards(parts, size, num_shards, where)
    for record in shards:
        found = store.size(record.file)
        if found != record.bytes:
            state = "missing" if found is None else f"{found} bytes, its record says {record.bytes}"
            raise MergeError(f"{store.where(record.file)}: {state}")
    return shards


def _combined_token_hash(shards: list[ShardRecord]) -> str:
    digest = hashlib.sha256()
    for record in sorted(shards, key=lambda r: r.index):
        digest.update(record.token_ids_sha256.encode())
    return digest.hexdigest()


def finish_manifest(store: CacheStore, origin: Manifest, shards: list[ShardRecord], created_at: str) -> Manifest:
    """The cache's manifest.json from a part's fingerprints and settings (`origin`) and every shard
    record, marked complete when they cover every example; written atomically, last; returned."""
    fields = {f.name: getattr(origin, f.name) for f in dataclasses.fields(Manifest)}
    manifest = Manifest(**{**fields, "shards": sorted(shards, key=lambda r: r.index), "created_at": created_at})
    manifest.complete = manifest.num_rows == manifest.dataset.num_examples
    manifest.token_ids_sha256 = _combined_token_hash(manifest.shards)
    store.write_text(MANIFEST_NAME, manifest.to_json())
    return manifest


def merge_parts(cache: str) -> Manifest:
    """Check the parts of `cache` and write its manifest.json (atomically, last); returns it."""
    store = CacheStore.open(cache)
    parts = read_parts(store)
    shards = check_parts(store, parts)
    # created_at: deterministic, so two workers merging at once write the same bytes
    return finish_manifest(store, parts[min(parts)], shards, min(p.created_at for p in parts.values()))


def try_merge(store: CacheStore) -> Manifest | None:
    """Merge if every worker's part is present and complete (the automatic final step), else None."""
    parts = read_parts(store)
    if not parts:
        return None
    size = parse_part_name(next(iter(parts)))[1]
    if len(parts) != size or not all(p.complete for p in parts.values()):
        return None
    return merge_parts(store.uri)
