"""Stage one: run the teacher once over the training data and cache what stage two needs.

    python -m pipeline cache-teacher --config configs/demo.yaml      (or: make cache-teacher)

Steps (stages/teacher/stage_one.py holds each): load + tokenize the data, every input check before
any teacher time is spent -> fingerprint teacher, tokenizer and data -> open or resume the cache ->
for each shard not yet in the manifest: score its examples with the engine, then hand them to a
background writer that writes the shard and updates the manifest while the engine scores the next
one -> mark complete and print a summary. One process is the N = 1 case of the data-parallel worker
path (stages/scale_out/workers.py: shard i -> worker i mod N), so a killed run resumes exactly
where it stopped, however it was run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from stages.scale_out.launch import clear_cache
from stages.scale_out.parts import WorkerSpec
from stages.scale_out.workers import run_worker
from stages.settings import StageConfig

__all__ = ["run_cache_teacher", "CacheSummary"]


@dataclass
class CacheSummary:
    cache_dir: str
    examples: int
    tokens: int
    positions: int
    truncated: int
    shards: int
    shards_written_now: int
    bytes: int
    bytes_per_token: float
    wall_seconds: float
    tokens_per_second: float       # teacher pass incl. top-k and shard writing; engine start excluded
    skipped: int = 0               # examples refused and left out (data.on_bad_example=skip): ids in the manifest
    leading_bos_dropped: int = 0   # text rows that began with the BOS string (one BOS kept)

    def render(self) -> str:
        return "\n".join([
            f"cache: {self.cache_dir}",
            f"  examples {self.examples:,}   tokens {self.tokens:,}   trained positions {self.positions:,}   truncated {self.truncated:,}",
            *([f"  skipped examples {self.skipped:,} (data.on_bad_example=skip; ids in manifest.json dataset.skipped_examples)"
               f"   duplicated leading BOS dropped {self.leading_bos_dropped:,}"] if self.skipped or self.leading_bos_dropped else []),
            f"  shards {self.shards} ({self.shards_written_now} written now)   {self.bytes / 2**20:.2f} MiB   "
            f"{self.bytes_per_token:.1f} bytes/token",
            f"  wall {self.wall_seconds:.1f} s (incl. engine start)   teacher pass {self.tokens_per_second:,.0f} tok/s "
            "(incl. top-k and writing)"
            if self.shards_written_now else "  already complete: nothing to compute",
        ])


def run_cache_teacher(config: StageConfig, overwrite: bool = False, engine=None) -> CacheSummary:
    """Stage one in this process (module docstring): worker 0 of 1. `overwrite` empties cache.dir
    first; `engine`: an already open engine to use instead of opening one from `config.cache` (the
    benchmark reuses one across runs); the caller then closes it."""
    start = time.perf_counter()
    if engine is not None and engine.k != config.cache.k:
        raise ValueError(f"the engine passed to run_cache_teacher has k={engine.k}, cache.k={config.cache.k}")
    if overwrite:
        clear_cache(config)
    run = run_worker(config, WorkerSpec(0, 1, "single"), engine=engine)
    manifest = run.merged
    return CacheSummary(
        cache_dir=config.cache.dir, examples=manifest.num_rows, tokens=manifest.num_tokens,
        positions=sum(r.positions for r in manifest.shards), truncated=sum(r.truncated for r in manifest.shards),
        shards=len(manifest.shards), shards_written_now=run.shards_written_now, bytes=manifest.num_bytes,
        bytes_per_token=manifest.num_bytes / max(manifest.num_tokens, 1), wall_seconds=time.perf_counter() - start,
        tokens_per_second=run.tokens_per_second, skipped=len(manifest.dataset.skipped_examples),
        leading_bos_dropped=manifest.dataset.leading_bos_dropped,
    )
