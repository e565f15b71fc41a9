"""Bench section (c): how fast cached shards become training tensors, against how fast a training
step consumes tokens.

The path is the trainer's: `open_cache` -> `load_cache_dataset` (memory-mapped Arrow via `datasets`;
its one-time Parquet -> Arrow conversion is reported separately) -> rows fetched a batch at a time
(`__getitems__`, as torch's DataLoader does) -> `CacheCollator`. Neither step loops over tokens in Python.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline.bench.settings import BenchSettings
from stages.student.collator import CacheCollator, pad_token_id
from stages.student.reader import load_cache_dataset, open_cache

__all__ = ["measure_reader"]


def _decode_pass(dataset, collate: CacheCollator, batch: int) -> tuple[int, float]:
    """(tokens, seconds) of one pass over the whole dataset in batches."""
    tokens, start = 0, time.perf_counter()
    for first in range(0, len(dataset), batch):
        out = collate(dataset.__getitems__(list(range(first, min(first + batch, len(dataset))))))
        tokens += int(out["attention_mask"].sum())
    return tokens, time.perf_counter() - start


def measure_reader(cache_dir: Path, model: str, s: BenchSettings, train_tok_s: float) -> dict:
    """Decode tok/s (best of `reader_passes`) and its ratio to the training step's tok/s."""
    manifest = open_cache(cache_dir, model)
    collate = CacheCollator(pad_token_id(model), manifest.settings.k, encoding=manifest.settings.encoding)
    with tempfile.TemporaryDirectory(prefix="mtcache-bench-hf-") as hf_cache:
        start = time.perf_counter()
        dataset = load_cache_dataset(cache_dir, manifest, hf_cache_dir=hf_cache)
        convert_s = time.perf_counter() - start
        best = 0.0
        for _ in range(s.reader_passes):
            tokens, seconds = _decode_pass(dataset, collate, s.batch)
            best = max(best, tokens / seconds)
    return {"tokens": tokens, "rows": len(dataset), "batch": s.batch, "decode_tok_s": best,
            "arrow_conversion_s": convert_s, "train_tok_s": train_tok_s, "decode_over_train": best / train_tok_s}
