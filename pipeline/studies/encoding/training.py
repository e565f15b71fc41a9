"""The training comparison: two short stage-two runs on the same teacher values, a float32 cache vs
the default encoding transcoded from it, and how far their logged curves differ."""
from __future__ import annotations

import csv
from pathlib import Path

from pipeline.config import load_config
from pipeline.studies.encoding.settings import DEFAULT_LEVEL, StudyConfig
from stages.student.runner import run_train
from stages.teacher.runner import run_cache_teacher
from storage_schemas import DEFAULT_VALUE_ENCODING, Manifest
from storage_schemas.transcode import transcode_cache

__all__ = ["compare_training", "log_column", "max_step_difference"]


def _train(cfg: StudyConfig, cache_dir: Path, run_dir: Path) -> dict:
    config = load_config("configs/demo.yaml", [f"cache.dir={cache_dir}", f"train.output_dir={run_dir}",
                                               f"train.max_steps={cfg.train_steps}", f"train.save_steps={cfg.train_steps}",
                                               "train.logging_steps=1", f"model={cfg.model}", f"train.seed={cfg.seed}"])
    metrics = run_train(config)
    log = (run_dir / "log.csv").read_text().splitlines()
    return {"final_loss": metrics["final_loss"], "final_ce": metrics["final_ce"], "final_kl": metrics["final_kl"],
            "cache_bytes_per_token": Manifest.load(cache_dir).num_bytes / Manifest.load(cache_dir).num_tokens,
            "log": log}


def compare_training(cfg: StudyConfig, out: Path) -> dict:
    """Train on `cfg.train_cache` (made with the hf engine in topk_f32 when missing) and on its
    transcoding into the default encoding; final metrics and the per-step logs of both."""
    f32_cache = Path(cfg.train_cache)
    if not (f32_cache / "manifest.json").exists():
        f32_cache = out / "train-cache-f32"
        run_cache_teacher(load_config("configs/demo.yaml", [f"cache.dir={f32_cache}", "cache.engine=hf",
                                                            "cache.encoding=topk_f32", f"model={cfg.model}"]))
    default_cache = out / f"train-cache-{DEFAULT_VALUE_ENCODING}"
    if not (default_cache / "manifest.json").exists():
        transcode_cache(f32_cache, default_cache, DEFAULT_VALUE_ENCODING, DEFAULT_LEVEL)
    return {"f32_cache": str(f32_cache), "steps": cfg.train_steps,
            "topk_f32": _train(cfg, f32_cache, out / "train-f32"),
            DEFAULT_VALUE_ENCODING: _train(cfg, default_cache, out / f"train-{DEFAULT_VALUE_ENCODING}")}


def log_column(training: dict, enc: str, column: str) -> dict[int, float]:
    """step -> value of one logged column (log.csv) of the run on encoding `enc`."""
    return {int(r["step"]): float(r[column]) for r in csv.DictReader(training[enc]["log"])}


def max_step_difference(training: dict, column: str) -> float:
    """Largest |difference| of a logged column between the two runs, over the steps both logged."""
    a, b = log_column(training, "topk_f32", column), log_column(training, DEFAULT_VALUE_ENCODING, column)
    return max(abs(a[step] - b[step]) for step in a.keys() & b.keys())
