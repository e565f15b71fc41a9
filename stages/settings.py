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
    # the teacher and the student base: a local HF model directory, or a Hub id org/name (stages/hub.py:
    # resolved to its local snapshot directory when the config is loaded; an existing local path wins)
    model: str = "build/default/base-model"
    model_revision: str = ""             # Hub id only: branch, tag or commit ("" = main); unused for a local path
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # recorded, not read, not identity: which Hub ids the paths above were resolved from
    # ({model | data.path | eval.source_path | ...: {id, revision, commit, path}}; stages/hub.py)
    hub_sources: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(bool(self.model), "model: empty")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """The resolved config as YAML (`config.yaml` beside a cache or a run)."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
