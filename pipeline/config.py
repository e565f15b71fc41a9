"""Typed configuration: one dataclass per stage, filled from YAML and `key=value` overrides.

    python -m pipeline train --config configs/demo.yaml train.kl_weight=0.5 train.lora.rank=16

Every field is documented where it is declared and validated in `__post_init__`; an unknown key
(in the YAML or on the command line) is an error that names it and lists the valid ones. The
resolved config is written next to every output (`config.yaml` in the cache and run directories).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from storage_schemas import DEFAULT_ENCODING

__all__ = ["DataConfig", "CacheConfig", "LoraSettings", "TrainConfig", "EvalConfig", "SweepConfig", "ApproxConfig", "Config", "load_config", "to_dict"]

ENGINES = ("vllm", "hf")
VLLM_OUTPUTS = ("pooler", "prompt_logprobs")  # stages/teacher/vllm_engine.py OUTPUTS
ESTIMATORS = ("tail", "topk", "full_kl", "none", "live", "l2", "lalora")
LORA_VARIANTS = ("lora", "rslora", "dora", "pissa", "olora")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# --- sections -----------------------------------------------------------------------------
@dataclass
class DataConfig:
    path: str = "build/default/data/target_train.jsonl"  # file, glob, directory or saved dataset
    split: str = "train"                 # split to read
    text_field: str = "text"             # used when messages_field is empty
    messages_field: str = ""             # chat data: list of {role, content, ...}; only assistant bodies are trained
    tools_field: str = "tools"           # chat data: a column of tool definitions passed to the template (`tools=`), when present
    max_length: int = 256                # longer sequences are truncated on the right (counted, reported)
    max_examples: int = 0                # 0 = all; else the first N (quick runs)
    on_bad_example: str = "refuse"       # refuse (stop, naming file + example) | skip (leave it out, id kept as a gap, counted)

    def __post_init__(self) -> None:
        _require(bool(self.path), "data.path: empty")
        _require(self.on_bad_example in ("refuse", "skip"), f"data.on_bad_example: {self.on_bad_example!r} not in refuse|skip")
        _require(self.max_length >= 2, f"data.max_length: must be >= 2, got {self.max_length}")
        _require(self.max_examples >= 0, f"data.max_examples: must be >= 0, got {self.max_examples}")


@dataclass
class CacheConfig:
    dir: str = "runs/demo/cache"         # where shards and manifest.json go
    engine: str = "vllm"                 # vllm (default) | hf (transformers forward; oracle, no-vLLM machines)
    k: int = 32                          # non-target tokens kept per position
    encoding: str = DEFAULT_ENCODING     # storage_schemas.ENCODINGS (topk_idd_rel4q112); topk_f32 = exact (3.3x the bytes)
    rows_per_shard: int = 256            # sequences per Parquet shard
    zstd_level: int = 9                  # Parquet zstd level (9: ~2 bytes/token below 3 at ~0.5x its write speed)
    dtype: str = "float32"               # teacher compute dtype: float32 | bfloat16 | float16
    batch_tokens: int = 32768            # hf engine: tokens per forward; vllm: tokens per generate() call
    vllm_output: str = "pooler"          # vllm: pooler (top-k as tensors from vLLM's worker) | prompt_logprobs (stock API, fallback)
    vllm_kv_cache_gib: float = 1.0       # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.85 # vLLM on CUDA
    tensor_parallel_size: int = 1        # vLLM: GPUs one teacher is split across (layers' matrices)
    pipeline_parallel_size: int = 1      # vLLM: pipeline stages (layer groups); GPUs per worker = tp * pp
    local_dir: str = ""                  # remote cache.dir (s3://...): local working copy; "" = ~/.cache/mtcache/remote/<hash>

    def __post_init__(self) -> None:
        from storage_schemas import get_encoding

        _require(self.engine in ENGINES, f"cache.engine: {self.engine!r} not in {ENGINES}")
        _require(self.k >= 1, f"cache.k: must be >= 1, got {self.k}")
        _require(self.vllm_output in VLLM_OUTPUTS, f"cache.vllm_output: {self.vllm_output!r} not in {VLLM_OUTPUTS}")
        get_encoding(self.encoding)
        _require(self.rows_per_shard >= 1, f"cache.rows_per_shard: must be >= 1, got {self.rows_per_shard}")
        _require(1 <= self.zstd_level <= 22, f"cache.zstd_level: must be in 1..22, got {self.zstd_level}")
        _require(self.dtype in ("float32", "bfloat16", "float16"), f"cache.dtype: {self.dtype!r} unsupported")
        _require(self.tensor_parallel_size >= 1 and self.pipeline_parallel_size >= 1,
                 "cache.tensor_parallel_size and cache.pipeline_parallel_size must be >= 1")


@dataclass
class LoraSettings:
    variant: str = "lora"                # lora | rslora | dora | pissa | olora
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # every linear layer but the output head (peft), or module names

    def __post_init__(self) -> None:
        _require(self.variant in LORA_VARIANTS, f"train.lora.variant: {self.variant!r} not in {LORA_VARIANTS}")
        _require(self.rank >= 1, f"train.lora.rank: must be >= 1, got {self.rank}")
        _require(0.0 <= self.dropout < 1.0, f"train.lora.dropout: must be in [0, 1), got {self.dropout}")
        names = self.target_modules
        _require(names == "all-linear" or (isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names)),
                 f"train.lora.target_modules: expected \"all-linear\" or a non-empty list of module names "
                 f"(e.g. [q_proj, v_proj]), got {names!r}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo/train"  # adapter, config.yaml, metrics.json, logs
    estimator: str = "tail"              # tail | topk | full_kl | none | live | l2 | lalora
    kl_weight: float = 1.0               # lambda in CE + lambda * mean KL (l2/lalora: CE + lambda * penalty)
    lora: LoraSettings = field(default_factory=LoraSettings)
    learning_rate: float = 1e-3
    lr_scheduler: str = "cosine"         # any transformers scheduler name
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 8                  # sequences per micro-batch
    grad_accum: int = 1                  # micro-batches per optimizer step
    epochs: float = 1.0
    max_steps: int = 0                   # > 0 overrides epochs
    seed: int = 0
    save_steps: int = 50                 # checkpoint every N optimizer steps
    logging_steps: int = 5
    bf16: str = "auto"                   # auto (bf16 on CUDA) | true | false
    streaming: bool = False              # stream shards instead of memory-mapping (huge/remote caches)
    fused_loss: bool = False             # chunked lm_head + loss from the last hidden state: no [B, T, V] logits (not live)
    fused_chunk_size: int = 0            # fused_loss rows per chunk; 0 = auto (one fp32 [rows, V] buffer <= 1 GiB)
    allow_model_mismatch: bool = False   # train on a cache made by other weights (never other tokenizer)
    # lalora only (stages/student/weight_penalties.py): diagonal Fisher from SOURCE (retention) text
    fisher_data: str = ""                # jsonl/parquet/saved dataset with a "text" column; required for lalora
    fisher_examples: int = 64            # the first N texts of fisher_data (one per-example gradient each)
    fisher_max_length: int = 256         # tokens per Fisher text (truncated on the right)
    fisher_floor: float = 0.1            # F_i += fisher_floor * mean(F): anchors A, whose Fisher is 0 at B = 0
    k: int = 0                           # cached estimators: use the first k cached tokens (the teacher's top k); 0 = all

    def __post_init__(self) -> None:
        _require(self.estimator in ESTIMATORS, f"train.estimator: {self.estimator!r} not in {ESTIMATORS}")
        _require(self.estimator != "lalora" or bool(self.fisher_data),
                 "train.fisher_data: required by estimator 'lalora' (path to source/retention text for the Fisher)")
        _require(self.fisher_examples >= 1, f"train.fisher_examples: must be >= 1, got {self.fisher_examples}")
        _require(self.fisher_max_length >= 2, f"train.fisher_max_length: must be >= 2, got {self.fisher_max_length}")
        _require(self.fisher_floor >= 0, f"train.fisher_floor: must be >= 0, got {self.fisher_floor}")
        _require(self.k >= 0, f"train.k: must be >= 0 (0 = all cached tokens), got {self.k}")
        _require(self.kl_weight >= 0, f"train.kl_weight: must be >= 0, got {self.kl_weight}")
        _require(self.learning_rate > 0, f"train.learning_rate: must be > 0, got {self.learning_rate}")
        _require(self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
        _require(self.epochs > 0 or self.max_steps > 0, "train: set epochs > 0 or max_steps > 0")
        _require(self.save_steps >= 1 and self.logging_steps >= 1, "train.save_steps and train.logging_steps must be >= 1")
        _require(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        _require(self.bf16 in ("auto", "true", "false"), f"train.bf16: {self.bf16!r} not in auto|true|false")
        _require(not (self.fused_loss and self.estimator == "live"),
                 "train.fused_loss: not supported with estimator 'live' (its teacher needs the full logits)")
        _require(self.fused_chunk_size >= 0, f"train.fused_chunk_size: must be >= 0, got {self.fused_chunk_size}")


@dataclass
class EvalConfig:
    source_path: str = "build/default/data/source_heldout.jsonl"  # retention set: what must not be forgotten
    target_path: str = "build/default/data/target_heldout.jsonl"  # held-out data of the new task
    # Each set is read as stage one reads data: a set whose rows hold data.messages_field (or
    # "messages") is chat, scored on the assistant bodies; otherwise data.text_field, every token.
    text_field: str = ""                 # DEPRECATED: use data.text_field (still honoured, with a warning)
    max_length: int = 256                # sequences are truncated to this many tokens
    max_examples: int = 300              # per set; 0 = all
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.text_field:
            import warnings

            warnings.warn("eval.text_field is deprecated: eval reads each set with data.text_field / "
                          "data.messages_field, like stage one; remove eval.text_field from the config",
                          FutureWarning, stacklevel=2)
        _require(self.max_length >= 2, f"eval.max_length: must be >= 2, got {self.max_length}")
        _require(self.max_examples >= 0 and self.batch_size >= 1, "eval.max_examples >= 0 and eval.batch_size >= 1")


@dataclass
class SweepConfig:
    output_dir: str = "runs/sweep"       # one sub-directory per run + results.json/.md + frontier.png
    methods: list[str] = field(default_factory=lambda: ["none", "tail", "full_kl", "topk"])  # train.estimator values
    kl_weights: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])  # lambdas (ignored by `none`)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # per-method lambda grids replacing kl_weights for that method, e.g. {l2: [0.1, 1], lalora: [1e3]}
    # (weight penalties live on another scale than the KL)
    method_kl_weights: dict[str, list[float]] = field(default_factory=dict)
    ks: list[int] = field(default_factory=list)             # optional axis: train.k values (<= cache.k); [] = cache's k
    lora_variants: list[str] = field(default_factory=list)  # optional axis: train.lora.variant values; [] = as configured

    def __post_init__(self) -> None:
        bad = [m for m in [*self.methods, *self.method_kl_weights] if m not in ESTIMATORS]
        _require(not bad, f"sweep.methods / sweep.method_kl_weights: {bad} not in {ESTIMATORS}")
        _require(bool(self.methods) and bool(self.kl_weights) and bool(self.seeds), "sweep: methods, kl_weights and seeds must be non-empty")
        self.kl_weights = [float(w) for w in self.kl_weights]
        for method, weights in self.method_kl_weights.items():
            _require(isinstance(weights, list) and bool(weights) and all(isinstance(w, (int, float)) and w >= 0 for w in weights),
                     f"sweep.method_kl_weights.{method}: expected a non-empty list of numbers >= 0, got {weights!r}")
        self.method_kl_weights = {m: [float(w) for w in ws] for m, ws in self.method_kl_weights.items()}
        _require(all(k >= 1 for k in self.ks), f"sweep.ks: every k must be >= 1, got {self.ks}")
        bad = [v for v in self.lora_variants if v not in LORA_VARIANTS]
        _require(not bad, f"sweep.lora_variants: {bad} not in {LORA_VARIANTS}")


@dataclass
class ApproxConfig:
    """The approximation study (stages/approx_study.py): cached D_k against the exact masked KL D."""
    output_dir: str = "runs/approx"      # its k = |V|-1 cache of held-out data + approx_study.json/.md
    runs: list[str] = field(default_factory=lambda: ["none-l0-s0", "tail-l1-s0"])  # fixed students: run dirs, names under sweep.output_dir
    examples: int = 200                  # held-out target sequences (eval.target_path, eval.max_length)
    ks: list[int] = field(default_factory=lambda: [1, 4, 16, 64])  # |V|-1 (exact) is always added
    batch_size: int = 8

    def __post_init__(self) -> None:
        _require(bool(self.runs), "approx.runs: empty")
        _require(self.examples >= 1 and self.batch_size >= 1, "approx.examples and approx.batch_size must be >= 1")
        _require(all(k >= 1 for k in self.ks), f"approx.ks: every k must be >= 1, got {self.ks}")


@dataclass
class Config:
    model: str = "build/default/base-model"  # local HF model directory: the teacher and the student base
    data: DataConfig = field(default_factory=DataConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    approx: ApproxConfig = field(default_factory=ApproxConfig)

    def __post_init__(self) -> None:
        _require(bool(self.model), "model: empty")


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
    """Config from a YAML file (or defaults) with `section.key=value` overrides applied on top."""
    raw: dict = {}
    if path:
        text = Path(path).read_text()
        raw = yaml.safe_load(text) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected section.key=value")
        key, text_value = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(text_value))
    return _build(Config, raw, "")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
