"""Stage one's shard writer: Arrow conversion, zstd Parquet writing and the manifest update, on a
background thread so that the teacher engine never waits for compression.

    with ShardWriter(cache_dir, manifest, encoding, k, zstd_level) as writer:
        for index in todo:
            rows = ...                                   # score the shard (main thread)
            writer.submit(index, first_example, rows, truncated)
    # leaving the block waits for every queued shard and re-raises a writer error

Order of effects per shard, as before: table -> temp file, fsync, rename (write_shard) -> manifest
lists the shard -> manifest saved. So a killed run leaves at most a `.tmp` file, never a manifest
entry for a shard that is not complete on disk. The queue is bounded (`max_pending` shards), so
the scores of at most that many shards wait in memory. Arrow/Parquet, zstd and hashlib release the
GIL, so the writer runs beside vLLM's front end (and the hf engine's torch ops) in parallel.
"""
from __future__ import annotations

import queue
import threading
from pathlib import Path

from stages.common import failpoints
from storage_schemas import Manifest
from storage_schemas.shard_io import ShardRow, rows_to_table, write_shard

__all__ = ["ShardWriter"]

_STOP = object()


class ShardWriter:
    """Writes submitted shards in order on one background thread; see the module docstring.

    `tokens_written` counts the tokens of shards durably written (read it after the block).
    A writer error is raised in the main thread at the next `submit` or when the block ends;
    shards queued after a failure are dropped (the manifest never lists them: a re-run redoes them).
    """

    def __init__(self, cache_dir: str | Path, manifest: Manifest, encoding: str, k: int, zstd_level: int,
                 max_pending: int = 2) -> None:
        self.cache_dir, self.manifest = Path(cache_dir), manifest
        self.encoding, self.k, self.zstd_level = encoding, k, zstd_level
        self.tokens_written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self._thread.start()

    def submit(self, index: int, first_example: int, rows: list[ShardRow], truncated: int) -> None:
        """Queue one shard (blocks while `max_pending` shards are waiting)."""
        self._raise_if_failed()
        self._queue.put((index, first_example, rows, truncated))

    def close(self) -> None:
        """Wait for every queued shard; re-raise the writer's error if it had one."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # The main thread failed: still finish the shards already scored (they are valid), but
        # let the main thread's error propagate rather than a writer error.
        try:
            self.close()
        except Exception:  # noqa: BLE001 - the original error matters more
            pass

    # --- the thread -------------------------------------------------------------------------
    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a cache shard in {self.cache_dir} failed: {self._error}") from self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:  # after a failure keep draining so submit() never blocks
                try:
                    self._write(*item)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self._error = err

    def _write(self, index: int, first_example: int, rows: list[ShardRow], truncated: int) -> None:
        table = rows_to_table(rows, self.encoding, self.k)
        record = write_shard(self.cache_dir, index, first_example, table, self.zstd_level, truncated=truncated)
        failpoints.hit("after_shard_renamed", index)  # tests: the file is in place, the manifest does not list it
        self.manifest.shards = sorted([*self.manifest.shards, record], key=lambda r: r.index)
        self.manifest.save(self.cache_dir)
        self.tokens_written += record.tokens
        failpoints.hit("after_shard_published", index)  # tests: a hard kill here (stages/common/failpoints.py)
