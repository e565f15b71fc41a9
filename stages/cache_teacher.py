"""Stage one: run the teacher once over the training data and cache what stage two needs.

    python -m pipeline cache-teacher --config configs/demo.yaml      (or: make cache-teacher)

Steps: load + tokenize the data (all bad input is reported before any teacher time is spent) ->
fingerprint teacher, tokenizer and data -> open or resume the cache directory -> for each shard
not yet in the manifest: score its examples with the engine, then hand them to a background writer
that writes the shard and updates the manifest while the engine scores the next one -> mark
complete and print a summary. Example i always lands in shard i // rows_per_shard, so a killed run
resumes exactly where it stopped and N workers split the shard indices
(stages/scale_out/workers.py: shard i -> worker i mod N).
"""
from __future__ import annotations

import hashlib
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.config import Config, save_config
from pipeline.data import INPUT_RULES_VERSION, Example, InputReport, load_rows, source_files, source_sha256, tokenize_rows
from pipeline.fingerprints import model_vocab_size, teacher_fingerprint, tokenizer_fingerprint
from stages.teacher.engine import PositionScores, open_engine
from stages.teacher.shard_writer import ShardWriter
from stages.teacher.value_checks import check_teacher_scores
from storage_schemas import (
    MANIFEST_NAME, CacheSettings, DatasetFingerprint, EngineInfo, FingerprintMismatch, Manifest,
)
from storage_schemas.shard_io import ShardRow

__all__ = ["run_cache_teacher", "plan_manifest", "load_examples", "check_k", "check_token_ids"]


# --- input checks: every one runs before any engine is opened ------------------------------------
def check_k(k: int, vocab_size: int) -> None:
    """At most vocab_size - 1 non-target tokens exist per position."""
    if k > vocab_size - 1:
        raise ValueError(f"cache.k={k}: at most vocab_size - 1 = {vocab_size - 1} non-target tokens exist")


def check_token_ids(examples: list[Example], vocab_size: int, data_path: str, tokenizer=None) -> None:
    """ValueError naming the data file, the first example, the id and the vocabulary size if any token
    id has no row in the model's embeddings [0, vocab_size) (a token added to the tokenizer only).
    `tokenizer` (optional) lets the message say how many tokens it has beyond those rows."""
    bad = [e for e in examples if len(e.input_ids) and not 0 <= int(e.input_ids.min()) <= int(e.input_ids.max()) < vocab_size]
    if not bad:
        return
    ids = bad[0].input_ids
    token = int(ids[(ids < 0) | (ids >= vocab_size)][0])
    extra = len(tokenizer) - vocab_size if tokenizer is not None else 0
    hint = (f"the tokenizer has {extra} added token(s) beyond the model's {vocab_size} embedding rows "
            f"(id {token} is {tokenizer.convert_ids_to_tokens(token)!r}): resize the model's embeddings "
            "(model.resize_token_embeddings(len(tokenizer)), then save the model) or remove the token(s) from the tokenizer"
            if extra > 0 and token >= vocab_size else "is model= the directory this tokenizer belongs to?")
    raise ValueError(f"{data_path}: example {bad[0].example_id} has token id {token}, outside the model's "
                     f"vocabulary [0, {vocab_size}) ({len(bad)} example(s) in all); {hint}")


def load_examples(config: Config) -> tuple[list[Example], InputReport]:
    """The whole dataset, tokenized and checked against the model (cache.k, token ids): bad input is
    reported here, before any engine is opened. Stage one and every scale-out worker start with it.
    The report lists examples skipped under data.on_bad_example=skip and duplicated BOS dropped."""
    from transformers import AutoTokenizer

    vocab_size = model_vocab_size(config.model)
    check_k(config.cache.k, vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    rows = load_rows(config.data)
    report = InputReport()
    examples = tokenize_rows(tqdm(rows, desc="tokenizing", unit="ex", leave=False), tokenizer, config.data, report=report)
    if not examples:
        raise ValueError(f"{config.data.path}: no usable example ({len(report.skipped)} skipped; first: {report.skipped[0][1]})"
                         if report.skipped else f"{config.data.path}: no examples")
    check_token_ids(examples, vocab_size, config.data.path, tokenizer)
    for example_id, reason in report.skipped[:5]:  # the user opted in to skipping: still say what and why
        tqdm.write(f"skipped (data.on_bad_example=skip): {reason}")
    if len(report.skipped) > 5:
        tqdm.write(f"... and {len(report.skipped) - 5} more skipped examples (ids in manifest.json)")
    return examples, report


# --- set-up -----------------------------------------------------------------------------------
def _engine_info(config: Config) -> EngineInfo:
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if config.cache.engine == "vllm":
        import vllm

        versions["vllm"] = vllm.__version__
    return EngineInfo(name=config.cache.engine, dtype=config.cache.dtype, versions=versions)


def plan_manifest(config: Config, num_examples: int, report: InputReport | None = None) -> Manifest:
    """The manifest this run would write, before any shard: fingerprints and settings (and, from
    `report`, the ids of skipped examples and the count of duplicated leading BOS dropped)."""
    report = report or InputReport()
    files = source_files(config.data.path)
    data = config.data
    return Manifest(
        teacher=teacher_fingerprint(config.model),
        tokenizer=tokenizer_fingerprint(config.model),
        dataset=DatasetFingerprint(
            source=str(Path(data.path).resolve()), split=data.split, field=data.messages_field or data.text_field,
            format="chat" if data.messages_field else "text", source_sha256=source_sha256(files), num_examples=num_examples,
            input_rules=INPUT_RULES_VERSION, tools_field=data.tools_field if data.messages_field else "",
            skipped_examples=[i for i, _ in report.skipped],
            leading_bos_dropped=report.leading_bos_dropped,
        ),
        settings=CacheSettings(
            k=config.cache.k, encoding=config.cache.encoding, max_length=data.max_length, truncation="right",
            rows_per_shard=config.cache.rows_per_shard, zstd_level=config.cache.zstd_level,
        ),
        engine=_engine_info(config),
    )


def _open_cache_dir(cache_dir: Path, planned: Manifest, overwrite: bool) -> Manifest:
    """Resume a matching cache, refuse a different one (unless overwrite), or start fresh."""
    if overwrite and cache_dir.exists():
        shutil.rmtree(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in cache_dir.glob("*.tmp"):  # a killed run's half-written shard or manifest
        leftover.unlink()
    if not (cache_dir / MANIFEST_NAME).exists():
        if any(cache_dir.glob("shard-*.parquet")):
            raise FileExistsError(f"{cache_dir}: holds shards but no manifest; use --overwrite to start over")
        return planned
    existing = Manifest.load(cache_dir)
    try:
        existing.check_same_origin(planned)
    except FingerprintMismatch as err:
        raise FingerprintMismatch(f"{cache_dir} holds a cache of something else: {err}. "
                                  "Use another cache.dir, or --overwrite to replace it.") from None
    return existing


# --- the teacher pass ---------------------------------------------------------------------------
def _batches_by_tokens(examples: list[Example], batch_tokens: int):
    batch, tokens = [], 0
    for example in examples:
        if batch and tokens + len(example.input_ids) > batch_tokens:
            yield batch
            batch, tokens = [], 0
        batch.append(example)
        tokens += len(example.input_ids)
    if batch:
        yield batch


def _to_row(example: Example, scores: PositionScores, source: str) -> ShardRow:
    keep = example.loss_mask  # only trained positions are stored
    row = ShardRow(
        example_id=example.example_id, input_ids=example.input_ids, loss_mask=keep,
        target_logprob=scores.target_logprob[keep], topk_ids=scores.topk_ids[keep], topk_logprobs=scores.topk_logprobs[keep],
    )
    check_teacher_scores(row, source)  # before the writer sees it: a NaN (fp16 overflow) is never stored
    return row


def _score_shard(engine, examples: list[Example], batch_tokens: int, bar: tqdm, source: str) -> list[ShardRow]:
    rows = []
    for batch in _batches_by_tokens(examples, batch_tokens):
        scores = engine.score([e.input_ids for e in batch])
        rows.extend(_to_row(e, s, source) for e, s in zip(batch, scores))
        bar.update(sum(len(e.input_ids) for e in batch))
        bar.set_postfix(examples=f"{rows[-1].example_id + 1}", refresh=False)
    return rows


def _combined_token_hash(manifest: Manifest) -> str:
    digest = hashlib.sha256()
    for record in sorted(manifest.shards, key=lambda r: r.index):
        digest.update(record.token_ids_sha256.encode())
    return digest.hexdigest()


def _open_engine(config: Config):
    cache = config.cache
    extra = {"output": cache.vllm_output, "kv_cache_gib": cache.vllm_kv_cache_gib,
             "gpu_memory_utilization": cache.gpu_memory_utilization} if cache.engine == "vllm" else {}
    if cache.engine == "vllm":  # teachers larger than one GPU: passed to vllm.LLM as is
        extra.update(tensor_parallel_size=cache.tensor_parallel_size, pipeline_parallel_size=cache.pipeline_parallel_size)
    return open_engine(cache.engine, config.model, k=cache.k, dtype=cache.dtype, max_length=config.data.max_length,
                       batch_tokens=max(cache.batch_tokens, config.data.max_length), **extra)


def _write_shards(engine, config: Config, examples: list[Example], todo: list[int], manifest: Manifest) -> tuple[int, float]:
    """Score each shard in `todo` here while a background ShardWriter compresses, writes and records
    the previous one (so the engine does not wait for zstd).

    Returns (tokens written, seconds): the pass's throughput, engine start-up excluded."""
    cache, per_shard = config.cache, config.cache.rows_per_shard
    start = time.perf_counter()
    total = sum(len(e.input_ids) for s in todo for e in examples[s * per_shard:(s + 1) * per_shard])
    with tqdm(total=total, desc="teacher pass", unit="tok", unit_scale=True, dynamic_ncols=True) as bar, \
            ShardWriter(cache.dir, manifest, cache.encoding, cache.k, cache.zstd_level) as writer:
        for index in todo:
            shard_examples = examples[index * per_shard:(index + 1) * per_shard]
            rows = _score_shard(engine, shard_examples, cache.batch_tokens, bar, config.data.path)
            writer.submit(index, shard_examples[0].example_id, rows, truncated=sum(e.truncated for e in shard_examples))
    return writer.tokens_written, time.perf_counter() - start


# --- the recipe ----------------------------------------------------------------------------------
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
            f"  shards {self.shards} ({self.shards_written_now} written now)   {self.bytes / 2**20:.2f} MiB   {self.bytes_per_token:.1f} bytes/token",
            f"  wall {self.wall_seconds:.1f} s (incl. engine start)   teacher pass {self.tokens_per_second:,.0f} tok/s (incl. top-k and writing)"
            if self.shards_written_now else "  already complete: nothing to compute",
        ])


def run_cache_teacher(config: Config, overwrite: bool = False, engine=None) -> CacheSummary:
    """Stage one (module docstring). `engine`: an already open engine to use instead of opening one
    from `config.cache` (the benchmark reuses one across runs); the caller then closes it."""
    start = time.perf_counter()
    if engine is not None and engine.k != config.cache.k:
        raise ValueError(f"the engine passed to run_cache_teacher has k={engine.k}, cache.k={config.cache.k}")
    examples, report = load_examples(config)
    cache_dir = Path(config.cache.dir)
    manifest = _open_cache_dir(cache_dir, plan_manifest(config, len(examples), report), overwrite)
    save_config(config, cache_dir / "config.yaml")
    per_shard = config.cache.rows_per_shard
    todo = [s for s in range(math.ceil(len(examples) / per_shard)) if manifest.shard(s) is None]
    written_tokens, pass_seconds = 0, 0.0
    if todo and engine is not None:
        written_tokens, pass_seconds = _write_shards(engine, config, examples, todo, manifest)
    elif todo:
        engine = _open_engine(config)
        try:
            written_tokens, pass_seconds = _write_shards(engine, config, examples, todo, manifest)
        finally:
            engine.close()
    manifest.complete = manifest.num_rows == len(examples)
    manifest.token_ids_sha256 = _combined_token_hash(manifest)
    manifest.save(cache_dir)
    wall = time.perf_counter() - start
    return CacheSummary(
        cache_dir=str(cache_dir), examples=manifest.num_rows, tokens=manifest.num_tokens,
        positions=sum(r.positions for r in manifest.shards), truncated=sum(r.truncated for r in manifest.shards),
        shards=len(manifest.shards), shards_written_now=len(todo), bytes=manifest.num_bytes,
        bytes_per_token=manifest.num_bytes / max(manifest.num_tokens, 1), wall_seconds=wall,
        tokens_per_second=written_tokens / pass_seconds if written_tokens else 0.0,
        skipped=len(manifest.dataset.skipped_examples), leading_bos_dropped=manifest.dataset.leading_bos_dropped,
    )
