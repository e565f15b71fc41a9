"""Stage two's settings: the `train:` section of a config and its `lora:` part (composed in
pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from stages.checks import require
from stages.student.methods import get_method
from stages.student.trainer_args import check_trainer_args, normalize_report_to
from stages.student.variants import LORA_VARIANTS, MUTATES_BASE

__all__ = ["LoraSettings", "TrainConfig", "LORA_VARIANTS", "QUANTIZATIONS"]

QUANTIZATIONS = ("none", "4bit")  # train.quantization: the base as stored | NF4 through bitsandbytes (QLoRA)


@dataclass
class LoraSettings:
    variant: str = "lora"                # lora | rslora | dora | pissa | olora
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # every linear layer but the output head (peft), or module names

    def __post_init__(self) -> None:
        require(self.variant in LORA_VARIANTS, f"train.lora.variant: {self.variant!r} not in {LORA_VARIANTS}")
        require(self.rank >= 1, f"train.lora.rank: must be >= 1, got {self.rank}")
        require(0.0 <= self.dropout < 1.0, f"train.lora.dropout: must be in [0, 1), got {self.dropout}")
        names = self.target_modules
        require(names == "all-linear" or (isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names)),
                 f"train.lora.target_modules: expected \"all-linear\" or a non-empty list of module names "
                 f"(e.g. [q_proj, v_proj]), got {names!r}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo/train"  # adapter, config.yaml, metrics.json, logs
    method: str = "tail"                 # stages/student/methods.py: tail | topk | full_kl | none | live | l2 | lalora
    reg_weight: float = 1.0              # lambda: CE + lambda * mean per-token KL, or CE + lambda * penalty (l2, lalora)
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
    # auto: chunked lm_head + loss from the last hidden state (no [B, T, V] logits) wherever it applies,
    # else unfused, the reason in the run summary; true: fused or an error; false: never fused
    fused_loss: str | bool = "auto"
    fused_chunk_size: int = 0            # fused_loss rows per chunk; 0 = auto (one fp32 [rows, V] buffer <= 1 GiB)
    allow_model_mismatch: bool = False   # train on a cache made by other weights (never other tokenizer)
    # lalora only (stages/student/weight_penalties.py): diagonal Fisher from SOURCE (retention) text
    fisher_data: str = ""                # jsonl/parquet/saved dataset with a "text" column; required for lalora
    fisher_examples: int = 64            # the first N texts of fisher_data (one per-example gradient each)
    fisher_max_length: int = 256         # tokens per Fisher text (truncated on the right)
    fisher_floor: float = 0.1            # F_i += fisher_floor * mean(F): anchors A, whose Fisher is 0 at B = 0
    k: int = 0                           # cached estimators: use the first k cached tokens (the teacher's top k); 0 = all
    # none | 4bit: QLoRA, the base's linear layers in NF4 through bitsandbytes (extra `quant`; CPU and CUDA), matmuls
    # in the bf16/fp32 compute dtype; not with pissa/olora (stages/student/adapters.py make_student)
    quantization: str = "none"
    # tensorboard (scalars in <output_dir>/tensorboard) | wandb | mlflow (each when installed) | none, or a list
    report_to: str | list[str] = "tensorboard"
    # more TrainingArguments fields, e.g. {gradient_checkpointing: true, optim: adamw_torch_fused}; keys the
    # project sets are refused with a pointer (stages/student/trainer_args.py)
    trainer_args: dict[str, Any] = field(default_factory=dict)

    # Old names still read (pipeline/config.py load_config: a FutureWarning naming the new key; a
    # run directory's saved config.yaml written before the method registry resumes under the new names).
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"estimator": "method", "kl_weight": "reg_weight"}

    def __post_init__(self) -> None:
        method = get_method(self.method)
        for key in method.requires:
            require(bool(getattr(self, key)), f"train.{key}: required by method {self.method!r}")
        require(self.fisher_examples >= 1, f"train.fisher_examples: must be >= 1, got {self.fisher_examples}")
        require(self.fisher_max_length >= 2, f"train.fisher_max_length: must be >= 2, got {self.fisher_max_length}")
        require(self.fisher_floor >= 0, f"train.fisher_floor: must be >= 0, got {self.fisher_floor}")
        require(self.k >= 0, f"train.k: must be >= 0 (0 = all cached tokens), got {self.k}")
        require(self.reg_weight >= 0, f"train.reg_weight: must be >= 0, got {self.reg_weight}")
        require(self.learning_rate > 0, f"train.learning_rate: must be > 0, got {self.learning_rate}")
        require(self.batch_size >= 1 and self.grad_accum >= 1, "train.batch_size and train.grad_accum must be >= 1")
        require(self.epochs > 0 or self.max_steps > 0, "train: set epochs > 0 or max_steps > 0")
        require(self.save_steps >= 1 and self.logging_steps >= 1, "train.save_steps and train.logging_steps must be >= 1")
        require(0.0 <= self.warmup_ratio < 1.0, f"train.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        require(self.bf16 in ("auto", "true", "false"), f"train.bf16: {self.bf16!r} not in auto|true|false")
        if isinstance(self.fused_loss, bool):  # YAML true/false, and configs saved before `auto`
            self.fused_loss = "true" if self.fused_loss else "false"
        require(self.fused_loss in ("auto", "true", "false"), f"train.fused_loss: {self.fused_loss!r} not in auto|true|false")
        require(self.fused_loss != "true" or method.supports_fused,
                f"train.fused_loss: not supported with method {self.method!r} (the chunked loss computes CE and a "
                "cached estimator from the last hidden state; this method's regularizer needs the full logits)")
        require(self.fused_chunk_size >= 0, f"train.fused_chunk_size: must be >= 0, got {self.fused_chunk_size}")
        require(self.quantization in QUANTIZATIONS, f"train.quantization: {self.quantization!r} not in {'|'.join(QUANTIZATIONS)}")
        require(self.quantization == "none" or self.lora.variant not in MUTATES_BASE,
                f"train.quantization={self.quantization}: not with train.lora.variant={self.lora.variant} (its init writes the "
                "residual W - BA into the base weights, which NF4 would round, so the saved stock LoRA would no longer add up)")
        self.report_to = normalize_report_to(self.report_to)
        check_trainer_args(self.trainer_args)
