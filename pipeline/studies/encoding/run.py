"""The encoding study's driver: score the teachers, measure every candidate encoding, compare training,
write study.json and study.md (what and why: this package's docstring, pipeline/studies/encoding/__init__.py).

    python -m pipeline encoding-study --out runs/encoding-study
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from pipeline.studies.encoding.measure import measure_set, speed, target_near_one
from pipeline.studies.encoding.report import machine, markdown, plot_training, speed_markdown
from pipeline.studies.encoding.settings import StudyConfig
from pipeline.studies.encoding.teachers import demo_sequences, random_model, student_logits, teacher_rows
from pipeline.studies.encoding.training import compare_training
from storage_schemas import DEFAULT_VALUE_ENCODING

__all__ = ["run_encoding_study", "run_and_print"]


def _run_speed_only(cfg: StudyConfig, out: Path, command: str) -> dict:
    rows = teacher_rows(cfg.model, demo_sequences(cfg), 2048)
    with tempfile.TemporaryDirectory(dir=out) as workdir:
        timings = speed(rows, cfg.k, Path(workdir))
    (out / "speed.json").write_text(json.dumps({"command": command, "machine": machine(), "speed": timings}, indent=1))
    (out / "speed.md").write_text(speed_markdown(timings))
    return {"speed": timings}


def _teacher_sets(cfg: StudyConfig, out: Path) -> dict[str, tuple[str, list[np.ndarray], float]]:
    """name -> (model dir, token sequences, std of the student's LoRA B)."""
    rng = np.random.default_rng(cfg.seed)
    random_dir = random_model(out, cfg.seed)
    return {"demo": (cfg.model, demo_sequences(cfg), cfg.lora_std),
            "random32k": (str(random_dir), [rng.integers(0, 32000, cfg.random_length).astype(np.int32)
                                            for _ in range(cfg.random_sequences)], cfg.random_lora_std)}


def run_encoding_study(cfg: StudyConfig, command: str = "python -m pipeline encoding-study") -> dict:
    """Run the study into `cfg.out` (study.json, study.md, training_curves.png; speed.* with
    `speed_only`) and return its result dict."""
    from transformers import AutoConfig

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.speed_only:
        return _run_speed_only(cfg, out, command)
    result = {"config": dataclasses.asdict(cfg), "command": command, "machine": machine(),
              "default": DEFAULT_VALUE_ENCODING, "sets": {}}
    for name, (model_dir, sequences, lora_std) in _teacher_sets(cfg, out).items():
        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        rows = teacher_rows(model_dir, sequences, vocab)
        logits, targets = student_logits(model_dir, sequences, lora_std, cfg.seed)
        with tempfile.TemporaryDirectory(dir=out) as workdir:
            result["sets"][name] = measure_set(name, rows, logits, targets, cfg, Path(workdir))
        del logits
    result["target_near_one"] = target_near_one()
    if cfg.train_steps > 0:
        for run in ("train-f32", f"train-{DEFAULT_VALUE_ENCODING}"):
            shutil.rmtree(out / run, ignore_errors=True)  # a re-run trains afresh
        result["training"] = compare_training(cfg, out)
        plot_training(result["training"], out / "training_curves.png")
    (out / "study.json").write_text(json.dumps(result, indent=1))
    (out / "study.md").write_text(markdown(result))
    return result


def run_and_print(cfg: StudyConfig, command: str = "python -m pipeline encoding-study") -> dict:
    """`python -m pipeline encoding-study`: `run_encoding_study`, then its markdown (speed.md's with `speed_only`)."""
    result = run_encoding_study(cfg, command)
    print(speed_markdown(result["speed"]) if cfg.speed_only else markdown(result))
    return result
