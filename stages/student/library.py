"""The cache from your own training code: the cached examples, their collator and the loss, without the CLI.

    from transformers import Trainer, TrainingArguments
    from stages.student.library import CacheLossMixin, load_cache

    data = load_cache("runs/demo/cache", "build/default/base-model", method="sampled_tail")
    class MyTrainer(CacheLossMixin, Trainer): ...
    trainer = MyTrainer(model=peft_model, args=TrainingArguments("out", remove_unused_columns=False),
                        train_dataset=data.dataset, data_collator=data.collator, method="sampled_tail", reg_weight=1.0)

`load_cache` does what `stages.student.runner.run_train` does before it builds the model: the fingerprint checks
(`open_cache`: the student's tokenizer, its base weights, a complete and verified cache), the dataset of
cached rows (`load_cache_dataset`, only the columns the method reads) and the `CacheCollator`. The loss is
`CacheLossMixin` (stages/student/loss_mixin.py), the CLI's `CacheTrainer` is that mixin on
transformers' `Trainer`, and TRL's `SFTTrainer` gets it in stages/student/trl_trainer.py.

Scope: the cached estimators (methods `sampled_tail`, the default, which needs a cache with tail draws; `tail`,
`topk`, `full_kl`, which read any cache) and `none` (CE only), fused
(`fused_loss=True`: the mixin calls the model for its last hidden state, no [B, T, V] logits) or unfused.
The weight penalties (`l2`, `lalora`) are a per-step term the mixin adds from `trainer.penalty`, which the
caller builds after creating the trainer, as stages/student/runner.py does:
`trainer.penalty = build_penalty(train_config, data.method, trainer.model, model_dir)` (stages.student.methods).

`method` may be a registered name or a `Method` (stages/student/methods.py); `load_cache` looks a name up
once and keeps the `Method` in `data.method`, which the mixin and `CacheSFTTrainer` take as it is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from stages.student.collator import CacheCollator, pad_token_id
from stages.student.loss_mixin import CacheLossMixin, batch_loss
from stages.student.methods import Method, as_method, build_penalty
from stages.student.reader import load_cache_dataset, open_cache
from stages.student.trainer import CacheTrainer, dataset_columns
from storage_schemas import DEFAULT_ENCODING, ENCODINGS, Manifest, get_encoding
from storage_schemas.remote import local_cache_copy

__all__ = ["CachedExamples", "load_cache", "CacheLossMixin", "CacheTrainer", "batch_loss", "build_penalty"]


@dataclass
class CachedExamples:
    """What a Trainer needs from a cache: its checked `manifest`, the `dataset` of cached rows (a
    `datasets.Dataset` in numpy format, or an IterableDataset when streamed) and the `collator` that
    turns rows into the batch `CacheLossMixin.compute_loss` reads (CacheCollator's docstring: shapes);
    `cache_dir` the local directory read, `method` the one the columns were chosen for (resolved)."""

    manifest: Manifest
    dataset: Any
    collator: CacheCollator
    cache_dir: str
    method: Method
    allow_model_mismatch: bool = False


def check_draws(method: Method, manifest, k: int, where: str) -> None:
    """Refuse a method that reads tail draws on a cache without them, or with train.k below the cache's k
    (the draws come from outside the cache's k tokens: a smaller head would leave tokens in neither)."""
    if not method.needs_draws:
        return
    encoding = get_encoding(manifest.settings.encoding)
    if not encoding.has_draws:
        drawn = [name for name, e in ENCODINGS.items() if e.has_draws]
        raise ValueError(f"{where}: train.method={method.name!r} reads the teacher's tail draws, but this cache's "
                         f"encoding {encoding.name!r} has none (a cache written before they were the default, or with "
                         f"another cache.encoding). Either train a method that reads this cache (train.method=tail, topk "
                         f"or full_kl; load_cache(..., method=\"tail\") from Python), or write a cache with draws in its "
                         f"own cache.dir: `python -m pipeline cache-teacher --config YOUR_CONFIG cache.dir=runs/drawn/cache "
                         f"cache.k=16 cache.encoding={DEFAULT_ENCODING}` (encodings with draws: {', '.join(drawn)}).")
    if k > manifest.settings.k:
        raise ValueError(f"{where}: train.k={k}, but the cache holds k={manifest.settings.k} tokens per position; use "
                         f"train.k=0 (all {manifest.settings.k}).")
    if k not in (0, manifest.settings.k):
        raise ValueError(f"{where}: train.k={k} with train.method={method.name!r}: the cache's draws come from outside "
                         f"its k={manifest.settings.k} tokens, so the head cannot be cut; use train.k=0 (all) or a "
                         "cache written with the k you want.")


def load_cache(cache_dir: str | os.PathLike, model_dir: str | os.PathLike, method: Method | str = "sampled_tail", *, k: int = 0,
               streaming: bool = False, allow_model_mismatch: bool = False, local_dir: str = "") -> CachedExamples:
    """The cached examples of `cache_dir` for training the base model in `model_dir` with `method`.

    `k`: use only the cache's top-k teacher tokens per position (0 = all, as train.k). `streaming`: an
    IterableDataset reading the shards directly. `cache_dir` may be an s3:// URI (mirrored to `local_dir`,
    as cache.local_dir). Raises FingerprintMismatch for another tokenizer or other teacher weights than
    the base's (`allow_model_mismatch` relaxes the latter only), ValueError for an incomplete or
    corrupt cache or an unknown method.
    """
    method = as_method(method)
    local = local_cache_copy(str(cache_dir), local_dir)
    manifest = open_cache(local, model_dir, allow_model_mismatch=allow_model_mismatch)
    check_draws(method, manifest, k, str(cache_dir))
    dataset = load_cache_dataset(local, manifest, streaming=streaming,
                                 columns=dataset_columns(method, manifest.settings.encoding))
    collator = CacheCollator(pad_token_id(model_dir), manifest.settings.k, with_teacher=method.reads_cache,
                             encoding=manifest.settings.encoding, use_k=k)
    return CachedExamples(manifest, dataset, collator, local, method, allow_model_mismatch)
