"""Stage one's runner: run the teacher once over the training data and cache what stage two needs.

    python -m pipeline cache-teacher --config configs/demo.yaml                 (or: make cache-teacher)
    python -m pipeline cache-teacher --config C --num-workers 2 --worker-rank 0 (this process: worker 0 of 2)
    python -m pipeline cache-teacher --config C --launcher ray --num-workers 2  (Ray runs both, then merges)

Steps (stages/teacher/stage_one.py holds each): load + tokenize the data, every input check before
any teacher time is spent -> fingerprint teacher, tokenizer and data -> open or resume the cache ->
for each shard not yet in the manifest: score its examples with the engine, then hand them to a
background writer that writes the shard and updates the manifest while the engine scores the next
one -> complete the manifest and print a summary.

This is the one place that decides how stage one runs: one process is worker 0 of 1; flags, a
Slurm array or torchrun make it worker r of N (stages/teacher/scale_out/parts.py `resolve_worker`); Ray runs
all N (stages/teacher/scale_out/ray_launcher.py). Every way ends in `run_worker` (stages/teacher/scale_out/workers.py),
so a killed run resumes exactly where it stopped however it was run, and in the manifest finished by
`finish_manifest` (stages/teacher/scale_out/merge.py). The runner is the only stage-one module that sees the
composed config: the pieces get a `TeacherJob` (model, data and cache sections).
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from stages.common.stage_config import StageConfig, config_yaml
from stages.teacher.scale_out.parts import local_working_dir, resolve_worker
from stages.teacher.scale_out.ray_launcher import run_with_ray
from stages.teacher.scale_out.workers import WorkerResult, run_worker
from stages.teacher.settings import CacheConfig
from stages.teacher.stage_one import TeacherJob
from storage_schemas import Manifest
from storage_schemas.remote import CacheStore

__all__ = ["run_cache_teacher", "StageOneSummary", "teacher_job", "clear_cache", "LAUNCHERS"]

LAUNCHERS = ("none", "ray")


@dataclass
class StageOneSummary:
    """What one stage-one invocation did: each worker it ran (one, or all N under Ray) and the cache's
    manifest (None while other workers of a scaled-out run are still writing)."""

    cache_dir: str
    workers: list[WorkerResult]
    manifest: Manifest | None
    wall_seconds: float
    launcher: str = "none"

    @property
    def shards_written_now(self) -> int:
        return sum(w.shards_written_now for w in self.workers)

    @property
    def tokens_per_second(self) -> float:
        """Teacher pass incl. top-k and shard writing, engine start excluded (summed over workers)."""
        return sum(w.tokens_per_second for w in self.workers)

    # The cache's figures, from its manifest (a summary without one has none of these).
    @property
    def examples(self) -> int:
        return self.manifest.num_rows

    @property
    def tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def positions(self) -> int:
        return sum(r.positions for r in self.manifest.shards)

    @property
    def truncated(self) -> int:
        return sum(r.truncated for r in self.manifest.shards)

    @property
    def shards(self) -> int:
        return len(self.manifest.shards)

    @property
    def bytes(self) -> int:
        return self.manifest.num_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.manifest.num_bytes / max(self.manifest.num_tokens, 1)

    @property
    def skipped(self) -> int:
        """Examples refused and left out (data.on_bad_example=skip; their ids are in the manifest)."""
        return len(self.manifest.dataset.skipped_examples)

    @property
    def leading_bos_dropped(self) -> int:
        return self.manifest.dataset.leading_bos_dropped

    def render(self) -> str:
        lines = [f"cache: {self.cache_dir}"]
        scaled = self.launcher == "ray" or self.workers[0].source != "single"  # flags, Slurm, torchrun
        if scaled:
            lines += [f"  {_worker_line(w)}" for w in self.workers]
        if self.launcher == "ray":
            lines.append(f"  ray: {len(self.workers)} workers, {sum(w.tokens_written_now for w in self.workers):,} tokens "
                         "written now, per-worker tok/s " + ", ".join(f"{w.tokens_per_second:,.0f}" for w in self.workers))
        if self.manifest is None:
            return "\n".join([*lines, "  other workers still running: the last one to finish merges the parts "
                                      "(or run `python -m pipeline merge-manifest CACHE`)"])
        lines += _manifest_lines(self, scaled)
        return "\n".join(lines)


def _worker_line(w: WorkerResult) -> str:
    return (f"worker {w.rank} of {w.size} ({w.source}): {w.shards_assigned} shards assigned, {w.shards_written_now} written now"
            + (f", {w.tokens_written_now:,} tokens at {w.tokens_per_second:,.0f} tok/s" if w.shards_written_now else ""))


def _manifest_lines(s: StageOneSummary, scaled: bool) -> list[str]:
    lines = [f"  examples {s.examples:,}   tokens {s.tokens:,}   trained positions {s.positions:,}   truncated {s.truncated:,}"]
    if s.skipped or s.leading_bos_dropped:
        lines.append(f"  skipped examples {s.skipped:,} (data.on_bad_example=skip; ids in manifest.json dataset.skipped_examples)"
                     f"   duplicated leading BOS dropped {s.leading_bos_dropped:,}")
    dataset = s.manifest.dataset
    if dataset.heldout_examples:
        lines.append(f"  held out of the cache (data.heldout_fraction={dataset.heldout_fraction:g}, eval's default target set): "
                     f"{len(dataset.heldout_examples):,} examples")
    if dataset.unclosed_assistant_turns:
        lines.append(f"  warning: {dataset.unclosed_assistant_turns:,} assistant turns "
                     + ("end with the EOS inserted by data.assistant_eos=append" if dataset.assistant_eos == "append" else
                        "are closed by no stop token or closing text: the model will not learn to stop from this chat "
                        "template (data.assistant_eos=append inserts the tokenizer's EOS)"))
    if scaled:
        m = s.manifest
        lines.append(f"  merged manifest: {len(m.shards)} shards, {m.num_rows:,} examples, {m.num_tokens:,} tokens, "
                     f"{m.num_bytes / 2**20:.2f} MiB (complete={m.complete})")
    else:
        lines.append(f"  shards {s.shards} ({s.shards_written_now} written now)   {s.bytes / 2**20:.2f} MiB   "
                     f"{s.bytes_per_token:.1f} bytes/token")
    lines.append(f"  wall {s.wall_seconds:.1f} s (incl. engine start)   teacher pass {s.tokens_per_second:,.0f} tok/s "
                 "(incl. top-k and writing)" if s.shards_written_now else "  already complete: nothing to compute")
    return lines


def teacher_job(config: StageConfig) -> TeacherJob:
    """The settings stage one's pieces read, taken from the composed config."""
    return TeacherJob(config.model, config.data, config.cache, config_yaml(config), config.hub_sources)


def clear_cache(cache: CacheConfig) -> None:
    """--overwrite: empty the cache (and a remote cache's local working copy)."""
    store = CacheStore.open(cache.dir)
    store.fs.delete_dir_contents(store.root, missing_dir_ok=True)
    if store.remote:
        shutil.rmtree(local_working_dir(cache), ignore_errors=True)


def run_cache_teacher(config: StageConfig, overwrite: bool = False, engine=None, *, launcher: str = "none",
                      num_workers: int | None = None, worker_rank: int | None = None,
                      ray_address: str | None = None) -> StageOneSummary:
    """Stage one as configured (module docstring). `overwrite` empties cache.dir first (refused for one
    of several workers: it would delete the others' shards); `engine`: an already open engine to use
    in this process instead of opening one from `config.cache` (the benchmark reuses one; the caller
    closes it). ValueError for contradictory flags, before any work."""
    start = time.perf_counter()
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher {launcher!r}: not in {LAUNCHERS}")
    if engine is not None and engine.k != config.cache.k:
        raise ValueError(f"the engine passed to run_cache_teacher has k={engine.k}, cache.k={config.cache.k}")
    job = teacher_job(config)
    if launcher == "ray":
        if worker_rank is not None:
            raise ValueError("--worker-rank: the Ray launcher runs every worker itself; drop it")
        if overwrite:
            clear_cache(config.cache)
        workers, manifest = run_with_ray(job, num_workers, ray_address)
    else:
        worker = resolve_worker(num_workers, worker_rank)  # one process: worker 0 of 1
        if overwrite and worker.size > 1:
            raise ValueError("--overwrite with several workers would delete the other workers' shards; "
                             "empty cache.dir once before starting them (or use --launcher ray --overwrite)")
        if overwrite:
            clear_cache(config.cache)
        result = run_worker(job, worker, engine=engine)
        workers, manifest = [result], result.merged
    return StageOneSummary(config.cache.dir, workers, manifest, time.perf_counter() - start, launcher)
