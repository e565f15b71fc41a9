"""Rewrite a complete cache's shards into another encoding: same rows, same teacher values.

    manifest = transcode_cache(Path("runs/demo/cache"), Path("runs/demo/cache-f16"), "topk_idd_f16")

Each shard is read, decoded (`decode_table`) and written again with the new encoding under the same
index, first example and truncation count; the new manifest is the source's with the new encoding,
zstd level, shard records and the current schema version, so `verify` checks it as any cache. A
lossy source gives its decoded values (the target encoding cannot restore what was rounded away).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from tqdm import tqdm

from storage_schemas.cache_schema import (
    EXAMPLE_ID_COLUMN,
    INPUT_IDS_COLUMN,
    LOSS_MASK_COLUMN,
    SCHEMA_VERSION,
    SEQUENCE_COLUMNS,
    get_encoding,
)
from storage_schemas.manifest import Manifest
from storage_schemas.shard_io import ShardRow, decode_table, read_shard, rows_to_table, write_shard

__all__ = ["transcode_cache"]


def _shard_rows(table, encoding: str, k: int) -> list[ShardRow]:
    """One shard's table -> its rows with decoded teacher arrays."""
    ids, logprobs, target = decode_table(table, encoding, k)
    rows, start = [], 0
    for row in table.select(list(SEQUENCE_COLUMNS)).to_pylist():
        n = int(np.sum(row[LOSS_MASK_COLUMN]))
        rows.append(ShardRow(row[EXAMPLE_ID_COLUMN], np.asarray(row[INPUT_IDS_COLUMN], np.int32),
                             np.asarray(row[LOSS_MASK_COLUMN], bool), target[start:start + n],
                             ids[start:start + n].astype(np.int32), logprobs[start:start + n]))
        start += n
    return rows


def transcode_cache(src: Path, dst: Path, encoding: str, zstd_level: int | None = None) -> Manifest:
    """Re-encode the complete cache in `src` into `dst` (created if missing; shards and manifest
    there are overwritten) with the registered `encoding`, at `zstd_level` (None: the source's level).
    Returns the new manifest, also saved in `dst`.

    Raises FileNotFoundError when `src` has no manifest; ValueError when `encoding` is not
    registered (naming the registered ones), when the source cache is not complete, when `dst` is
    `src`, or when a source shard fails its own checks (schema, encoding: `read_shard` names it).
    """
    src, dst = Path(src), Path(dst)
    manifest = Manifest.load(src)
    get_encoding(encoding)
    if not manifest.complete:
        raise ValueError(f"{src}: the cache is not complete ({len(manifest.shards)} shards so far); finish it first")
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: transcoding a cache onto itself would overwrite the shards it reads")
    level = manifest.settings.zstd_level if zstd_level is None else zstd_level
    dst.mkdir(parents=True, exist_ok=True)
    k, records = manifest.settings.k, []
    for record in tqdm(manifest.shards, desc=f"transcode -> {encoding}", unit="shard"):
        table = read_shard(src / record.file, manifest.settings.encoding)
        rows = _shard_rows(table, manifest.settings.encoding, k)
        records.append(write_shard(dst, record.index, record.first_example, rows_to_table(rows, encoding, k),
                                   level, record.truncated))
    settings = dataclasses.replace(manifest.settings, encoding=encoding, zstd_level=level)
    out = dataclasses.replace(manifest, settings=settings, shards=records, schema_version=SCHEMA_VERSION)
    out.save(dst)
    return out
