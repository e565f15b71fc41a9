"""Writing, reading and verifying cache shards: the only code that touches shard files.

    rows -> rows_to_table (encodes, vectorized) -> write_shard (temp name, fsync, rename) -> ShardRecord
    read_shard(path, encoding) -> table;  decode_table(table, encoding, k) -> ids, log-probs, targets
    verify_cache(dir)  -> list of problems, each naming the shard and what is wrong

How the Parquet file is laid out (byte-stream-split / dictionary columns, row-group size) is part
of the encoding, read back from the table's own schema metadata, so `write_shard` needs no options.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from storage_schemas.cache_schema import (
    DRAW_IDS_COLUMN,
    MASS_COLUMN,
    TAIL_ENTROPY_COLUMN,
    Encoding,
    encoding_of_schema,
    get_encoding,
    shard_file_name,
    shard_schema,
)
from storage_schemas.codecs import decode_draws, decode_teacher, encode_draws, encode_teacher
from storage_schemas.fingerprints import files_sha256
from storage_schemas.manifest import Manifest, ShardRecord

__all__ = ["ShardRow", "rows_to_table", "decode_table", "decode_draw_columns", "parquet_options", "write_shard", "read_shard",
           "token_ids_sha256", "verify_cache"]


@dataclass
class ShardRow:
    """One training sequence as stage one stores it (n = loss_mask.sum() trained positions)."""

    example_id: int
    input_ids: np.ndarray        # [T] int32
    loss_mask: np.ndarray        # [T-1] bool
    target_logprob: np.ndarray   # [n] float32
    topk_ids: np.ndarray         # [n, k] int32
    topk_logprobs: np.ndarray    # [n, k] float32, descending (the encoding codes them on write)
    tail_draw_ids: np.ndarray | None = None   # [n, m] ids drawn from the tail (encodings with tail draws)
    tail_entropy: np.ndarray | None = None    # [n] float32, nats (with them)

    def check(self, k: int, draws: int = 0) -> None:
        """Raise ValueError naming the example if the arrays disagree in shape."""
        t, n = len(self.input_ids), int(self.loss_mask.sum())
        problems = []
        if len(self.loss_mask) != t - 1:
            problems.append(f"loss_mask has {len(self.loss_mask)} entries for {t} tokens (want {t - 1})")
        if self.target_logprob.shape != (n,):
            problems.append(f"target_logprob shape {self.target_logprob.shape}, want ({n},)")
        for name in ("topk_ids", "topk_logprobs"):
            if getattr(self, name).shape != (n, k):
                problems.append(f"{name} shape {getattr(self, name).shape}, want ({n}, {k})")
        for name, shape in (("tail_draw_ids", (n, draws)), ("tail_entropy", (n,))):
            value = getattr(self, name)
            if draws and (value is None or np.shape(value) != shape):
                problems.append(f"{name} {'missing' if value is None else f'shape {np.shape(value)}'}, want {shape}")
            if not draws and value is not None:
                problems.append(f"{name} given, but the encoding stores no tail draws")
        if problems:
            raise ValueError(f"example {self.example_id}: " + "; ".join(problems))


def _offsets(lengths: np.ndarray) -> np.ndarray:
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if offsets[-1] > np.iinfo(np.int32).max:  # Arrow list offsets are int32
        raise ValueError(f"a shard column would hold {offsets[-1]:,} values (> 2^31-1): lower cache.rows_per_shard")
    return offsets.astype(np.int32)


def _list_array(parts: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """One Arrow list column from per-row numpy arrays, without a per-element Python loop."""
    lengths = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
    flat = np.concatenate([p.reshape(-1) for p in parts]) if parts else np.zeros(0)
    return _flat_list_array(flat, lengths, value_type)


def _flat_list_array(flat: np.ndarray, lengths: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    numpy_type = np.dtype(value_type.to_pandas_dtype())  # the encoding decides, e.g. float16
    values = pa.array(np.ascontiguousarray(flat.reshape(-1)).astype(numpy_type, copy=False), type=value_type)
    return pa.ListArray.from_arrays(pa.array(_offsets(lengths)), values)


def _teacher_columns(rows: list[ShardRow], enc: Encoding, k: int) -> list[pa.ListArray]:
    """The teacher columns (three, or four with a mass codec), encoded once over all the shard's
    positions (vectorized)."""
    n = np.fromiter((len(r.target_logprob) for r in rows), dtype=np.int64, count=len(rows))
    def stack(name: str, width: int, dtype) -> np.ndarray:
        parts = [np.asarray(getattr(r, name), dtype).reshape(-1, width) for r in rows]
        return np.concatenate(parts) if parts else np.zeros((0, width), dtype)
    stored = encode_teacher(enc, stack("topk_ids", k, np.int64), stack("topk_logprobs", k, np.float32),
                            stack("target_logprob", 1, np.float32)[:, 0])
    columns = [_flat_list_array(stored.target, n, enc.target_type), _flat_list_array(stored.ids, n * k, pa.int32()),
               _flat_list_array(stored.values, n * k, enc.value_type)]
    if stored.mass is not None:
        columns.append(_flat_list_array(stored.mass, n, pa.int32()))
    if enc.has_draws:
        m = enc.tail_draws
        draw_ids, entropy = encode_draws(enc, stack("tail_draw_ids", m, np.int64), stack("tail_entropy", 1, np.float32)[:, 0])
        columns += [_flat_list_array(draw_ids, n * m, pa.int32()), _flat_list_array(entropy, n, pa.float16())]
    return columns


def rows_to_table(rows: list[ShardRow], encoding: str | Encoding, k: int) -> pa.Table:
    """Rows -> one shard's Arrow table in `encoding` (a registered name or an `Encoding` object)."""
    schema = shard_schema(encoding)
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    for row in rows:
        row.check(k, enc.tail_draws)
    columns = [pa.array([r.example_id for r in rows], type=pa.int64())]
    for name in ("input_ids", "loss_mask"):
        value_type = schema.field(name).type.value_type
        numpy_type = np.dtype(value_type.to_pandas_dtype())
        columns.append(_list_array([np.asarray(getattr(r, name)).astype(numpy_type, copy=False) for r in rows],
                                   value_type))
    columns.extend(_teacher_columns(rows, enc, k))
    return pa.Table.from_arrays(columns, schema=schema)


def decode_draw_columns(table: pa.Table, encoding: str | Encoding) -> tuple[np.ndarray, np.ndarray]:
    """A shard table's tail-draw columns, decoded: draw ids int64 [n, m] (ascending) and tail entropies float32 [n]."""
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    flat = [table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False)
            for name in (DRAW_IDS_COLUMN, TAIL_ENTROPY_COLUMN)]
    return decode_draws(enc, *flat)


def decode_table(table: pa.Table, encoding: str | Encoding, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A shard table's teacher columns, decoded: ids int64 [n, k] (descending probability),
    log-probs float32 [n, k], target log-probs float32 [n], over all its rows in order."""
    enc = get_encoding(encoding) if isinstance(encoding, str) else encoding
    names = ("topk_ids", "topk_logprobs", "target_logprob") + ((MASS_COLUMN,) if enc.has_mass else ())
    flat = [table.column(name).combine_chunks().flatten().to_numpy(zero_copy_only=False) for name in names]
    return decode_teacher(enc, flat[0], flat[1], flat[2], k, flat[3] if enc.has_mass else None)


def token_ids_sha256(example_ids, input_ids: pa.ListArray) -> str:
    """Hash of (example id, token ids) for every row: fingerprints the data actually cached."""
    digest = hashlib.sha256()
    digest.update(np.asarray(example_ids, dtype=np.int64).tobytes())
    digest.update(np.asarray(input_ids.offsets).astype(np.int64).tobytes())
    digest.update(np.asarray(input_ids.values, dtype=np.int32).tobytes())
    return digest.hexdigest()


def parquet_options(enc: Encoding) -> dict:
    """`pq.write_table` keyword arguments for an encoding's file layout.

    Byte-stream-split applies to list<float/int> leaf columns ("name.list.element" in Parquet).
    """
    leaf = {"example_id": "example_id"}
    path = lambda name: leaf.get(name, f"{name}.list.element")  # noqa: E731
    options = {"use_dictionary": [path(c) for c in enc.dictionary] or False,
               "use_byte_stream_split": [path(c) for c in enc.byte_stream_split] or False}
    if enc.row_group_rows:
        options["row_group_size"] = enc.row_group_rows
    if enc.data_page_bytes:
        options["data_page_size"] = enc.data_page_bytes
    return options


def write_shard(cache_dir: str | os.PathLike, index: int, first_example: int, table: pa.Table,
                zstd_level: int, truncated: int) -> ShardRecord:
    """Write `table` as shard `index`: to a temp name, fsync, then rename, so a shard file that
    exists is always complete."""
    final = Path(cache_dir) / shard_file_name(index)
    tmp = final.with_name(final.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd", compression_level=zstd_level,
                   **parquet_options(encoding_of_schema(table.schema, str(final))))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    input_ids = table.column("input_ids").combine_chunks()
    mask = table.column("loss_mask").combine_chunks()
    return ShardRecord(
        index=index, file=final.name, first_example=first_example, rows=table.num_rows,
        tokens=len(input_ids.values), positions=int(np.asarray(mask.values).sum()), truncated=truncated,
        bytes=final.stat().st_size, sha256=files_sha256([final], with_names=False),
        token_ids_sha256=token_ids_sha256(table.column("example_id").to_numpy(), input_ids),
    )


def read_shard(path: str | os.PathLike, encoding: str) -> pa.Table:
    """Read a shard and check it has exactly the schema of `encoding` and declares that encoding
    (name and spec) in its metadata; ValueError names the file. Version-1 shards are accepted for
    the encodings version 1 had."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{path}: unreadable Parquet ({err})") from err
    declared = encoding_of_schema(table.schema, str(path))
    expected = get_encoding(encoding)
    if declared.name != expected.name or declared.spec_json() != expected.spec_json():
        raise ValueError(f"{path}: written with encoding {declared.name!r} ({declared.spec_json()}), "
                         f"the manifest says {expected.name!r} ({expected.spec_json()})")
    if not table.schema.remove_metadata().equals(shard_schema(expected).remove_metadata()):
        raise ValueError(f"{path}: schema differs from encoding {encoding}:\n{table.schema}")
    return table


def _verify_shard(cache_dir: Path, record: ShardRecord, manifest: Manifest) -> str | None:
    path = cache_dir / record.file
    if not path.exists():
        return f"{record.file}: listed in the manifest but missing"
    if path.stat().st_size != record.bytes:
        return f"{record.file}: {path.stat().st_size} bytes, manifest says {record.bytes} (truncated or replaced)"
    if files_sha256([path], with_names=False) != record.sha256:
        return f"{record.file}: sha256 mismatch (corrupt)"
    try:
        table = read_shard(path, manifest.settings.encoding)
    except ValueError as err:
        return str(err)
    if table.num_rows != record.rows:
        return f"{record.file}: {table.num_rows} rows, manifest says {record.rows}"
    k = manifest.settings.k
    n = int(np.asarray(table.column("loss_mask").combine_chunks().values).sum())
    ids_len = len(table.column("topk_ids").combine_chunks().values)
    if n != record.positions or ids_len != n * k:
        return f"{record.file}: {n} trained positions and {ids_len} cached ids, want {record.positions} and {record.positions * k}"
    return None


def verify_cache(cache_dir: str | os.PathLike, manifest: Manifest | None = None) -> list[str]:
    """Every problem found in the cache (empty list = verified): schema, counts, checksums."""
    cache_dir = Path(cache_dir)
    manifest = manifest or Manifest.load(cache_dir)
    problems = [p for r in manifest.shards if (p := _verify_shard(cache_dir, r, manifest))]
    if not manifest.complete:
        problems.append("manifest: cache is incomplete (stage one has not finished; re-run it to resume)")
    return problems
