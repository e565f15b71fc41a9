"""Typed configuration composed from the stages' own settings, filled from YAML and `key=value` overrides.

    python -m pipeline train --config configs/demo.yaml train.reg_weight=0.5 train.lora.rank=16

Each stage declares its section (stages/data/inputs.py DataConfig, stages/teacher/settings.py CacheConfig,
stages/student/settings.py TrainConfig, stages/eval/settings.py EvalConfig; composed as
stages/common/stage_config.py StageConfig); the studies' sections are declared here. Every field is documented
where it is declared and validated in `__post_init__`; an unknown key
(in the YAML or on the command line) is an error that names it and lists the valid ones. The
resolved config is written next to every output (`config.yaml` in the cache and run directories).
A key's old name (stages/common/saved_config.py `RENAMED_KEYS`) is refused here, naming the new one; only the
artifact reader, for config.yaml files the project saved itself, translates old names.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stages.common.checks import require as _require
from stages.common.saved_config import check_current_keys, read_saved_config
from stages.common.stage_config import StageConfig
from stages.data.hub import resolve_hub_ids
from stages.student.methods import method_names
from stages.student.variants import LALORA_CURVATURES, LORA_VARIANTS

__all__ = ["SweepConfig", "ApproxConfig", "Config", "load_config", "config_for_run"]

def _lambdas(key: str, weights) -> list[float]:
    """A lambda grid as floats; YAML reads `1e4` (no dot) as a string, so numeric strings are taken too."""
    def number(w):
        try:
            return float(w) if not isinstance(w, bool) else None
        except (TypeError, ValueError):
            return None
    values = [number(w) for w in weights] if isinstance(weights, list) else []
    _require(bool(values) and all(v is not None and v >= 0 for v in values),
             f"{key}: expected a non-empty list of numbers >= 0, got {weights!r}")
    return values


# --- sections -----------------------------------------------------------------------------
@dataclass
class SweepConfig:
    output_dir: str = field(default="runs/sweep", metadata={"help": (
        "one sub-directory per run + results.json/.md + frontier.png (and tensorboard/: the sweep's HPARAMS table)")})
    methods: list[str] = field(default_factory=lambda: ["none", "sampled_tail", "full_kl", "topk"], metadata={"help": (
        "train.method values (none runs once per seed)")})
    reg_weights: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0], metadata={"help": "lambdas (ignored by `none`)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "train.seed values"})
    method_reg_weights: dict[str, list[float]] = field(default_factory=dict, metadata={"help": (
        "per-method lambda grids replacing reg_weights for that method, e.g. {l2: [0.1, 1], lalora: [1e3]} "
        "(weight penalties live on another scale than the KL)")})
    ks: list[int] = field(default_factory=list, metadata={"help": (
        "optional axis: train.k values (<= cache.k; cached estimators only); [] = cache's k")})
    lora_variants: list[str] = field(default_factory=list, metadata={"help": (
        "optional axis: train.lora.variant values; [] = as configured")})
    lalora_curvatures: list[str] = field(default_factory=list, metadata={"help": (
        "optional axis for lalora only: train.lalora_curvature values (diag, kfac, tri_kfac); [] = as configured")})
    curvature_reg_weights: dict[str, list[float]] = field(default_factory=dict, metadata={"help": (
        "lalora's lambda grid per curvature, e.g. {diag: [1e4], kfac: [1e2]} (each form has its own scale); "
        "replaces method_reg_weights.lalora for that curvature")})
    fisher_batches: list[int] = field(default_factory=list, metadata={"help": (
        "optional axis for lalora only: train.fisher_batches values (0 = fisher_examples texts); [] = as configured")})
    lm_eval_metric: str = field(default="", metadata={"help": (
        "opt-in (costs a harness run per run): TASK:METRIC of lm-evaluation-harness, e.g. mtcache_source_heldout:bits_per_byte; "
        "every run's eval runs that task (eval.lm_eval.*), its row gets the metric's change over the base "
        "(lm_eval:TASK:METRIC), and frontier_lm_eval.png plots it as the forgetting axis. \"\" = off")})
    records_dir: str = field(default="", metadata={"help": (
        "a folder (tracked in git, e.g. under docs/) receiving each finished run's record as it finishes "
        "(<run>.json: its key, resolved config, eval.json and metrics.json; base_eval.json); a record whose key "
        "matches counts as done, so the sweep resumes from a fresh clone with no output_dir. \"\" = none")})
    shard: str = field(default="", metadata={"help": (
        "i/N: run only the grid's runs i, i+N, i+2N, ... (N processes split one grid; the cache must be "
        "complete first); the table covers every run with a result. \"\" = all (also: sweep --shard i/N)")})

    def __post_init__(self) -> None:
        if self.shard:
            parts = self.shard.split("/")
            _require(len(parts) == 2 and all(p.isdigit() for p in parts) and int(parts[0]) < int(parts[1]),
                     f"sweep.shard: expected i/N with 0 <= i < N, got {self.shard!r}")
        bad = [m for m in [*self.methods, *self.method_reg_weights] if m not in method_names()]
        _require(not bad, f"sweep.methods / sweep.method_reg_weights: {bad} not in {method_names()}")
        _require(bool(self.methods) and bool(self.reg_weights) and bool(self.seeds),
                 "sweep: methods, reg_weights and seeds must be non-empty")
        self.reg_weights = _lambdas("sweep.reg_weights", self.reg_weights)
        self.method_reg_weights = {m: _lambdas(f"sweep.method_reg_weights.{m}", ws) for m, ws in self.method_reg_weights.items()}
        _require(all(k >= 1 for k in self.ks), f"sweep.ks: every k must be >= 1, got {self.ks}")
        bad = [v for v in self.lora_variants if v not in LORA_VARIANTS]
        _require(not bad, f"sweep.lora_variants: {bad} not in {LORA_VARIANTS}")
        _require(not self.lm_eval_metric or (self.lm_eval_metric.count(":") == 1 and all(self.lm_eval_metric.split(":"))),
                 f"sweep.lm_eval_metric: expected TASK:METRIC (e.g. mtcache_source_heldout:bits_per_byte), got {self.lm_eval_metric!r}")
        bad = [c for c in [*self.lalora_curvatures, *self.curvature_reg_weights] if c not in LALORA_CURVATURES]
        _require(not bad, f"sweep.lalora_curvatures / sweep.curvature_reg_weights: {bad} not in {LALORA_CURVATURES}")
        self.curvature_reg_weights = {c: _lambdas(f"sweep.curvature_reg_weights.{c}", ws) for c, ws in self.curvature_reg_weights.items()}
        _require(all(isinstance(b, int) and b >= 0 for b in self.fisher_batches),
                 f"sweep.fisher_batches: every value must be an integer >= 0, got {self.fisher_batches}")
        _require(len(set(self.fisher_batches)) == len(self.fisher_batches) and
                 len(set(self.lalora_curvatures)) == len(self.lalora_curvatures),
                 "sweep.fisher_batches / sweep.lalora_curvatures: a value listed twice would name two runs alike")


@dataclass
class ApproxConfig:
    """The approximation study (pipeline/studies/approx_study.py): cached D_k against the exact masked KL D."""
    output_dir: str = field(default="runs/approx", metadata={"help": "its k = |V|-1 cache of held-out data + approx_study.json/.md"})
    runs: list[str] = field(default_factory=lambda: ["none-l0-s0", "tail-l1-s0"], metadata={"help": (
        "fixed students: run dirs, names under sweep.output_dir")})
    examples: int = field(default=200, metadata={"help": "held-out target sequences (eval.target_path, eval.max_length)"})
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64], metadata={"help": "|V|-1 (exact) is always added"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    tail_draws: int = field(default=16, metadata={"help": (
        "draws per position for estimators that read tail draws (sampled_tail), made from the full cache's teacher "
        "distribution outside each k as stage one makes them")})

    def __post_init__(self) -> None:
        _require(bool(self.runs), "approx.runs: empty")
        _require(self.tail_draws >= 1, f"approx.tail_draws: must be >= 1, got {self.tail_draws}")
        _require(self.examples >= 1 and self.batch_size >= 1, "approx.examples and approx.batch_size must be >= 1")
        _require(all(k >= 1 for k in self.ks), f"approx.ks: every k must be >= 1, got {self.ks}")


@dataclass
class Config(StageConfig):
    """The whole config: the stages' sections (stages/common/stage_config.py StageConfig) and the studies'."""
    sweep: SweepConfig = field(default_factory=SweepConfig, metadata={"help": (
        "the sweep: method x lambda x seed over one cache (pipeline/studies/sweep.py)")})
    approx: ApproxConfig = field(default_factory=ApproxConfig, metadata={"help": (
        "the approximation study (pipeline/studies/approx_study.py)")})


# --- building dataclasses from plain dicts --------------------------------------------------
def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _build(cls: type, raw: dict, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ValueError(f"unknown config key {key!r}; valid keys here: {sorted(known)}")
    values = {}
    for name, value in raw.items():
        kind = _field_type(cls, name)
        path = f"{where}.{name}" if where else name
        values[name] = _build(kind, value, path) if dataclasses.is_dataclass(kind) else _coerce(kind, value, path)
    return cls(**values)


def _coerce(kind: Any, value: Any, where: str) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(kind) or kind
    if origin is types.UnionType or origin is typing.Union:
        return value
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise ValueError(f"config key {where!r}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ValueError(f"override {dotted!r}: {part!r} is not a section")
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a hand-written YAML file (or defaults) with `section.key=value` overrides applied on
    top; Hub ids (`model: org/name`, `data.path: org/name`, ...) resolved to local paths, offline first
    (stages/data/hub.py). A key's old name is refused, naming the new one (stages/common/saved_config.py)."""
    raw: dict = {}
    if path:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping")
        check_current_keys(raw, str(path))
    return _with_overrides(raw, overrides)


def _with_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> Config:
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value")
        key, text_value = item.split("=", 1)
        value, alone = yaml.safe_load(text_value), {}
        _set_dotted(alone, key.strip(), value)  # the override as a one-key tree, to check its names
        check_current_keys(alone, f"override {item!r}")
        _set_dotted(raw, key.strip(), value)
    config = _build(Config, raw, "")
    resolve_hub_ids(config)  # once, here: every stage receives local paths (stages/data/hub.py)
    return config


def config_for_run(run_dir: str, overrides: list[str]) -> Config:
    """A run's own resolved config (so `eval --run` uses the model and sets it trained with), read by the
    artifact reader (old key names translated), with `overrides` (current names only) on top."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is it a train.output_dir?")
    if not (Path(run_dir) / "adapter").is_dir():
        raise FileNotFoundError(f"{run_dir}: no adapter/ (training not finished?)")
    return _with_overrides(read_saved_config(path), overrides)
