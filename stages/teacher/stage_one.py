"""Stage one's public pieces: load and check the examples, plan the manifest, open the engine, score
and write shards. Each takes the settings it reads (a `TeacherJob`: the model, the `data:` and `cache:`
sections), never the composed config. A stage-one worker (stages/teacher/scale_out/workers.py; one process is
worker 0 of 1, run by stages/teacher/runner.py) is made of these.

    job = TeacherJob(model, data, cache, config_text)       # stages.teacher.runner.teacher_job(config)
    examples, report = load_examples(job)                 # every input check, before any engine
    manifest = plan_manifest(job, len(examples), report)  # fingerprints and settings
    engine = open_teacher_engine(job)
    tokens, seconds = write_shards(engine, job, examples, todo, manifest)

Example i always lands in shard i // rows_per_shard, so a killed run resumes exactly where it
stopped and N workers split the shard indices (shard i -> worker i mod N).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from stages.data.hub import teacher_with_hub
from stages.data.inputs import DataConfig, Example, InputReport, heldout_ids, input_format, load_rows, source_files, tokenize_rows
from stages.teacher.engine import open_engine
from stages.teacher.scores import PositionScores
from stages.teacher.settings import CacheConfig
from stages.teacher.shard_writer import ShardWriter
from stages.teacher.value_checks import check_teacher_scores
from storage_schemas import DEFAULT_VALUE_ENCODING, CacheSettings, DatasetFingerprint, EngineInfo, Manifest, get_encoding
from storage_schemas.fingerprints import files_sha256, model_vocab_size, teacher_fingerprint, tokenizer_fingerprint
from storage_schemas.shard_io import ShardRow

__all__ = ["TeacherJob", "check_k", "check_token_ids", "load_examples", "engine_info", "plan_manifest",
           "open_teacher_engine", "score_shard", "write_shards"]


@dataclass(frozen=True)
class TeacherJob:
    """What stage one reads: the teacher (a local model directory), the `data:` and `cache:` sections,
    the resolved config as YAML text (saved as config.yaml beside the shards) and the Hub ids the
    paths were resolved from (recorded in the manifest, not identity)."""

    model: str
    data: DataConfig
    cache: CacheConfig
    config_text: str
    hub_sources: dict = field(default_factory=dict)

    def with_cache_dir(self, directory: str) -> "TeacherJob":
        """The same job writing into `directory` (a remote cache's local working copy)."""
        return replace(self, cache=replace(self.cache, dir=directory))


# --- input checks: every one runs before any engine is opened ------------------------------------
def check_k(k: int, vocab_size: int, encoding: str | None = None) -> None:
    """At most vocab_size - 1 non-target tokens exist per position; with an encoding that has tail draws, at
    most vocab_size - 2, so that a tail is left to draw from."""
    if k > vocab_size - 1:
        raise ValueError(f"cache.k={k}: at most vocab_size - 1 = {vocab_size - 1} non-target tokens exist")
    if encoding is not None and get_encoding(encoding).has_draws and k == vocab_size - 1:
        raise ValueError(f"cache.k={k} = vocab_size - 1 caches every non-target token: no tail is left for "
                         f"cache.encoding={encoding!r} to draw from. Use an encoding without draws (cache.encoding="
                         f"{DEFAULT_VALUE_ENCODING}; train.method=tail is then exact) or cache.k <= {vocab_size - 2}.")


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


def load_examples(job: TeacherJob) -> tuple[list[Example], InputReport]:
    """The whole dataset, tokenized and checked against the model (cache.k, token ids): bad input is
    reported here, before any engine is opened. Stage one and every scale-out worker start with it.
    The report lists examples skipped under data.on_bad_example=skip and duplicated BOS dropped."""
    from transformers import AutoTokenizer

    vocab_size = model_vocab_size(job.model)
    check_k(job.cache.k, vocab_size, job.cache.encoding)
    tokenizer = AutoTokenizer.from_pretrained(job.model)
    rows = load_rows(job.data)
    report = InputReport()
    examples = tokenize_rows(tqdm(rows, desc="tokenizing", unit="ex", leave=False), tokenizer, job.data, report=report,
                             fmt=input_format(job.data, rows.column_names))
    if job.data.heldout_fraction:  # kept out of the cache, gaps like skipped ids: eval's default target set
        report.heldout = heldout_ids([e.example_id for e in examples], job.data.heldout_fraction)
        if not report.heldout:
            raise ValueError(f"data.heldout_fraction={job.data.heldout_fraction} keeps no example of {len(examples)} out; "
                             "raise it, or set eval.target_path")
        held = set(report.heldout)
        examples = [e for e in examples if e.example_id not in held]
    if not examples:
        raise ValueError(f"{job.data.path}: no usable example ({len(report.skipped)} skipped; first: {report.skipped[0][1]})"
                         if report.skipped else f"{job.data.path}: no examples")
    check_token_ids(examples, vocab_size, job.data.path, tokenizer)
    for line in report.warnings():
        tqdm.write(f"warning: {line}")
    for example_id, reason in report.skipped[:5]:  # the user opted in to skipping: still say what and why
        tqdm.write(f"skipped (data.on_bad_example=skip): {reason}")
    if len(report.skipped) > 5:
        tqdm.write(f"... and {len(report.skipped) - 5} more skipped examples (ids in manifest.json)")
    return examples, report


# --- set-up -----------------------------------------------------------------------------------
def engine_info(cache: CacheConfig) -> EngineInfo:
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if cache.engine == "vllm":
        import vllm

        versions["vllm"] = vllm.__version__
    return EngineInfo(name=cache.engine, dtype=cache.dtype, versions=versions)


def plan_manifest(job: TeacherJob, num_examples: int, report: InputReport | None = None) -> Manifest:
    """The manifest this run would write, before any shard: fingerprints and settings (and, from
    `report`, the ids of skipped examples and the count of duplicated leading BOS dropped)."""
    report = report or InputReport()
    files = source_files(job.data.path)
    data, cache = job.data, job.cache
    fmt = report.format or input_format(data, load_rows(data, check_field=False).column_names)
    return Manifest(
        teacher=teacher_with_hub(teacher_fingerprint(job.model), job.hub_sources),  # + the Hub id/commit, recorded
        tokenizer=tokenizer_fingerprint(job.model),
        dataset=DatasetFingerprint(
            source=str(Path(data.path).resolve()), split=data.split, field=",".join(fmt.fields),
            format=fmt.kind, source_sha256=files_sha256(files), num_examples=num_examples,
            input_rules=fmt.rules, tools_field=data.tools_field if fmt.kind != "text" else "",
            skipped_examples=[i for i, _ in report.skipped],
            leading_bos_dropped=report.leading_bos_dropped,
            assistant_eos=data.assistant_eos if fmt.kind != "text" else "none",
            unclosed_assistant_turns=report.unclosed_turns,
            heldout_fraction=data.heldout_fraction, heldout_examples=report.heldout,
        ),
        settings=CacheSettings(
            k=cache.k, encoding=cache.encoding, max_length=data.max_length, truncation="right",
            rows_per_shard=cache.rows_per_shard, zstd_level=cache.zstd_level,
        ),
        engine=engine_info(cache),
    )


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
        tail_draw_ids=scores.tail_draw_ids[keep] if scores.tail_draw_ids is not None else None,
        tail_entropy=scores.tail_entropy[keep] if scores.tail_entropy is not None else None,
    )
    check_teacher_scores(row, source)  # before the writer sees it: a NaN (fp16 overflow) is never stored
    return row


def score_shard(engine, examples: list[Example], batch_tokens: int, bar: tqdm, source: str) -> list[ShardRow]:
    rows = []
    for batch in _batches_by_tokens(examples, batch_tokens):
        scores = engine.score([e.input_ids for e in batch], keys=[e.example_id for e in batch])
        rows.extend(_to_row(e, s, source) for e, s in zip(batch, scores))
        bar.update(sum(len(e.input_ids) for e in batch))
        bar.set_postfix(examples=f"{rows[-1].example_id + 1}", refresh=False)
    return rows


def open_teacher_engine(job: TeacherJob):
    cache = job.cache
    extra = {"output": cache.vllm_output, "kv_cache_gib": cache.vllm_kv_cache_gib,
             "gpu_memory_utilization": cache.gpu_memory_utilization} if cache.engine == "vllm" else {}
    if cache.engine == "vllm":  # teachers larger than one GPU: passed to vllm.LLM as is
        extra.update(tensor_parallel_size=cache.tensor_parallel_size, pipeline_parallel_size=cache.pipeline_parallel_size)
    encoding = get_encoding(cache.encoding)
    return open_engine(cache.engine, job.model, k=cache.k, dtype=cache.dtype, max_length=job.data.max_length,
                       batch_tokens=max(cache.batch_tokens, job.data.max_length), draws=encoding.tail_draws,
                       draw_seed=encoding.draw_seed, **extra)


def write_shards(engine, job: TeacherJob, examples: list[Example], todo: list[int], manifest: Manifest) -> tuple[int, float]:
    """Score each shard in `todo` here while a background ShardWriter compresses, writes and records
    the previous one (so the engine does not wait for zstd).

    Returns (tokens written, seconds): the pass's throughput, engine start-up excluded."""
    cache, per_shard = job.cache, job.cache.rows_per_shard
    start = time.perf_counter()
    total = sum(len(e.input_ids) for s in todo for e in examples[s * per_shard:(s + 1) * per_shard])
    with tqdm(total=total, desc="teacher pass", unit="tok", unit_scale=True, dynamic_ncols=True) as bar, \
            ShardWriter(cache.dir, manifest, cache.encoding, cache.k, cache.zstd_level) as writer:
        for index in todo:
            shard_examples = examples[index * per_shard:(index + 1) * per_shard]
            rows = score_shard(engine, shard_examples, cache.batch_tokens, bar, job.data.path)
            writer.submit(index, shard_examples[0].example_id, rows, truncated=sum(e.truncated for e in shard_examples))
    return writer.tokens_written, time.perf_counter() - start
