"""Which cache rows each DDP rank of stage two reads: a check of the data split, run like training.

    torchrun --nproc_per_node 2 -m pipeline rank-rows --config C [section.key=value ...]

Stage two needs no code of its own for DDP: under torchrun/accelerate the HF Trainer's dataloader
(accelerate's `prepare`) gives each rank a disjoint part of the cache. Map-style (default): one
seeded permutation shared by all ranks, cut into per-rank batches (`BatchSamplerShard`), each rank
reading only its rows of the memory-mapped shards. Streaming (`train.streaming=true`): with at least
as many shards as ranks, each rank opens only its own shard files (`IterableDataset.shard`).

This module builds the same Trainer as `stages/student/runner.py` and lists, per rank, the example ids its
dataloader yields in one epoch, into `train.output_dir/rank_rows/rank-R.json`.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.config import Config
from stages.student.adapters import make_student
from stages.student.methods import get_method
from stages.student.reader import load_cache_dataset, open_cache
from stages.student.trainer import build_trainer
from storage_schemas import EXAMPLE_ID_COLUMN
from storage_schemas.remote import local_cache_copy

__all__ = ["rank_example_ids", "write_rank_rows"]


def _ids_only(rows) -> dict[str, torch.Tensor]:
    return {EXAMPLE_ID_COLUMN: torch.tensor([int(np.asarray(r[EXAMPLE_ID_COLUMN])) for r in rows])}


def rank_example_ids(config: Config) -> tuple[int, list[int]]:
    """(this process's rank, the example ids its training dataloader yields in one epoch)."""
    cache_dir = local_cache_copy(config.cache.dir, config.cache.local_dir)
    manifest = open_cache(cache_dir, config.model, allow_model_mismatch=config.train.allow_model_mismatch)
    dataset = load_cache_dataset(cache_dir, manifest, streaming=config.train.streaming, columns=[EXAMPLE_ID_COLUMN])
    if config.train.streaming:
        dataset = dataset.shuffle(seed=config.train.seed, buffer_size=1024)  # as stages/student/runner.py does
    model = make_student(config.model, config.train.lora, torch.float32)
    trainer = build_trainer(model, dataset, _ids_only, config.train, get_method(config.train.method), manifest.num_rows)
    ids = [int(i) for batch in trainer.get_train_dataloader() for i in batch[EXAMPLE_ID_COLUMN]]
    return trainer.args.process_index, ids


def write_rank_rows(config: Config) -> Path:
    """`python -m pipeline rank-rows`: this rank's example ids into `train.output_dir/rank_rows/rank-R.json`."""
    rank, ids = rank_example_ids(config)
    out = Path(config.train.output_dir) / "rank_rows" / f"rank-{rank}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(ids))
    print(f"rank {rank}: {len(ids)} rows -> {out}")
    return out
