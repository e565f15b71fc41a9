"""The settings the stages read, composed: model, data, cache, train, eval (pipeline/config.py adds the
studies' sections and reads YAML); and how a resolved config is written next to every output.

    from stages.common.stage_config import StageConfig, save_config
    save_config(config, run_dir / "config.yaml")
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common.checks import require
from stages.data.inputs import DataConfig
from stages.eval.settings import EvalConfig
from stages.student.settings import TrainConfig
from stages.teacher.settings import CacheConfig

__all__ = ["StageConfig", "to_dict", "config_yaml", "save_config"]


@dataclass
class StageConfig:
    model: str = field(default="build/default/base-model", metadata={"help": (
        "the teacher and the student base: a local HF model directory, or a Hub id org/name (stages/data/hub.py: "
        "resolved to its local snapshot directory when the config is loaded; an existing local path wins)")})
    model_revision: str = field(default="", metadata={"help": (
        "Hub id only: branch, tag or commit (\"\" = main); unused for a local path")})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "stage one's input data and how it is tokenized"})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"help": "stage one: the teacher pass and its cache"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "stage two: the LoRA run on the cache"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "learning vs forgetting of a run"})
    hub_sources: dict[str, dict[str, str]] = field(default_factory=dict, metadata={"help": (
        "recorded, not read, not identity: which Hub ids the paths above were resolved from "
        "({model | data.path | eval.source_path | ...: {id, revision, commit, path}}; stages/data/hub.py)")})

    def __post_init__(self) -> None:
        require(bool(self.model), "model: empty")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_yaml(config: Any) -> str:
    """The resolved config as YAML text, in declaration order."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path, header: str = "") -> None:
    """The resolved config as YAML (`config.yaml` beside a cache or a run), after `header` written as
    `#` comment lines (what the config alone does not say, e.g. the data the run's cache holds)."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    Path(path).write_text(comments + config_yaml(config))
