"""Open a teacher cache for training: check it belongs to the student, verify it, read its shards.

    manifest = open_cache("runs/demo/cache", "build/default/base-model")
    dataset = load_cache_dataset("runs/demo/cache", manifest)      # memory-mapped, numpy rows

What `open_cache` refuses, each with the field and both values in the message:
- a tokenizer other than the student's (`tokenizer.sha256`, `tokenizer.vocab_size`): the cached ids
  would mean other tokens. Never relaxed.
- teacher weights other than the student base's (`teacher.weights_sha256`, `teacher.config_sha256`):
  the regularizer would pull towards another model. Relaxed by `allow_model_mismatch` (a warning).
- an incomplete cache (stage one still running or killed), an unknown schema version or value
  encoding, and any shard that is missing, truncated, corrupt or disagrees with the manifest.

Reading never writes into the cache directory (several runs may share one cache): `datasets`
keeps its Arrow conversion in its own cache (`hf_cache_dir`, default ~/.cache/huggingface).
Only local cache directories are supported (the manifest and checksums are read with plain I/O).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from storage_schemas import FingerprintMismatch, Manifest, get_encoding, shard_columns
from storage_schemas.fingerprints import teacher_fingerprint, tokenizer_fingerprint
from storage_schemas.shard_io import verify_cache

__all__ = ["open_cache", "load_cache_dataset", "check_tokenizer", "check_teacher", "SUPPORTED_SELECTIONS"]

# Which token selections this reader (and the collator's layout) understands; a cache written with
# another selection (e.g. a future "sampled_nontarget" with weights) is refused by name.
SUPPORTED_SELECTIONS = ("topk_nontarget", "topk_nontarget+tail_draws")


def _differences(group: str, cached: dict, student: dict, keys: Sequence[str]) -> list[str]:
    return [f"{group}.{key}: cache has {cached[key]!r}, student base model has {student[key]!r}"
            for key in keys if cached[key] != student[key]]


def check_tokenizer(manifest: Manifest, student_model_dir: str | os.PathLike) -> None:
    """FingerprintMismatch naming every tokenizer field that differs (sha256, vocab_size)."""
    cached, student = asdict(manifest.tokenizer), asdict(tokenizer_fingerprint(student_model_dir))
    problems = _differences("tokenizer", cached, student, ("sha256", "vocab_size"))
    if problems:
        raise FingerprintMismatch(
            "the cache was made with another tokenizer than the student's; its token ids and log-probs "
            "do not apply (allow_model_mismatch does not relax this):\n  " + "\n  ".join(problems)
        )


def check_teacher(manifest: Manifest, student_model_dir: str | os.PathLike, allow_model_mismatch: bool) -> None:
    """FingerprintMismatch (or a warning if allowed) when the cache's teacher weights are not the base's.

    The model path and revision are not compared: the same weights may live at another path.
    """
    cached, student = asdict(manifest.teacher), asdict(teacher_fingerprint(student_model_dir))
    problems = _differences("teacher", cached, student, ("weights_sha256", "config_sha256"))
    if not problems:
        return
    message = "the cache was made by other teacher weights than the student base model:\n  " + "\n  ".join(problems)
    if not allow_model_mismatch:
        raise FingerprintMismatch(message + "\n(set train.allow_model_mismatch=true, or load_cache(..., allow_model_mismatch=True), "
                                  "to train on it anyway)")
    warnings.warn(message + "\n(allowed by train.allow_model_mismatch)", stacklevel=3)


def open_cache(cache_dir: str | os.PathLike, student_model_dir: str | os.PathLike,
               allow_model_mismatch: bool = False, verify: bool = True) -> Manifest:
    """The cache's manifest, after every check in the module docstring (verification once per call).

    Cheap checks run first (manifest, tokenizer, completeness), so a wrong cache fails in
    milliseconds rather than after hashing every shard.
    """
    manifest = Manifest.load(cache_dir)  # refuses unknown schema versions and encodings
    selection = get_encoding(manifest.settings.encoding).selection
    if selection not in SUPPORTED_SELECTIONS:
        raise ValueError(f"{cache_dir}: selection {selection!r} is not supported by this reader ({SUPPORTED_SELECTIONS})")
    check_tokenizer(manifest, student_model_dir)
    if not manifest.complete:
        raise ValueError(f"{cache_dir}: the cache is incomplete (stage one has not finished); re-run stage one to resume it")
    if not manifest.shards:
        raise ValueError(f"{cache_dir}: the manifest lists no shards")
    check_teacher(manifest, student_model_dir, allow_model_mismatch)
    if verify:
        problems = verify_cache(cache_dir, manifest)
        if problems:
            raise ValueError(f"{cache_dir}: cache verification failed:\n  " + "\n  ".join(problems))
    return manifest


def load_cache_dataset(cache_dir: str | os.PathLike, manifest: Manifest, streaming: bool = False,
                       columns: Sequence[str] | None = None, hf_cache_dir: str | None = None):
    """The manifest's shards (in manifest order, never a glob) as a `datasets` dataset in numpy format.

    Map-style (default): memory-mapped Arrow, random access, `len()`. `streaming=True`: an
    IterableDataset reading the Parquet shards directly (caches larger than local disk).
    `columns` keeps only those (e.g. drop the teacher arrays for `none`/`live`, so they are never
    decoded). Rows come out as numpy arrays (datasets widens ints to int64 and floats, float16
    included, to float32), so the collator never builds per-token Python objects.
    """
    from datasets import load_dataset

    files = [str(Path(cache_dir) / shard.file) for shard in sorted(manifest.shards, key=lambda s: s.index)]
    present = shard_columns(manifest.settings.encoding)
    columns = list(columns) if columns is not None else list(present)
    unknown = sorted(set(columns) - set(present))
    if unknown:
        raise ValueError(f"unknown cache columns {unknown}; a shard of this cache "
                         f"(encoding {manifest.settings.encoding}) has {list(present)}")
    dataset = load_dataset("parquet", data_files={"train": files}, split="train", streaming=streaming,
                           cache_dir=hf_cache_dir, columns=columns)
    return dataset.with_format("numpy")
