"""The settings the stages read, composed: model, data, cache, train, eval (pipeline/config.py adds the
studies' sections and reads YAML); and how a resolved config is written next to every output.

    from stages.settings import StageConfig, save_config
    save_config(config, run_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.checks import require
from stages.eval_settings import EvalConfig
from stages.inputs import DataConfig
from stages.student.settings import TrainConfig
from stages.teacher.settings import CacheConfig

__all__ = ["StageConfig", "to_dict", "save_config"]


@dataclass
class StageConfig:
    model: str = "build/default/base-model"  # local HF model directory: the teacher and the student base
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        require(bool(self.model), "model: empty")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """The resolved config as YAML (`config.yaml` beside a cache or a run)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
