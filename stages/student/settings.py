"""Stage two's settings: the `train:` section of a config and its `lora:` part (composed in
pipeline/config.py). Importing them imports no torch: loading a config stays light."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stages.common.checks import require
from stages.student.methods import check_fused, get_method
from stages.student.trainer_args import check_trainer_args, normalize_report_to
from stages.student.variants import LALORA_CURVATURES, LORA_VARIANTS, MUTATES_BASE, NO_KFAC

__all__ = ["LoraSettings", "TrainConfig", "QUANTIZATIONS"]

QUANTIZATIONS = ("none", "4bit")  # train.quantization: the base as stored | NF4 through bitsandbytes (QLoRA)


@dataclass
class LoraSettings:
    variant: str = field(default="lora", metadata={"help": (
        "lora | rslora | dora | pissa | olora | randlora | sinelora (stages/student/variants.py; the families and "
        "their mapping of rank and alpha: stages/student/adapters.py)")})
    rank: int = field(default=8, metadata={"help": (
        "the adapter's rank r (peft `r`); randlora: the LoRA rank whose trainable-parameter count its random-basis "
        "rank is solved to match (stages/student/adapters.py randlora_basis_rank)")})
    alpha: float = field(default=16.0, metadata={"help": (
        "peft `lora_alpha`: the update is scaled by alpha / r (rslora: alpha / sqrt(r); randlora: alpha / rank too, "
        "through randlora_alpha)")})
    dropout: float = field(default=0.0, metadata={"help": "peft `lora_dropout` on the adapted layers' inputs"})
    target_modules: str | list[str] = field(default="all-linear", metadata={"help": (
        "all-linear: every linear layer but the output head (peft; fused qkv_proj/gate_up_proj included), or a "
        "list of module names; the run summary and metrics.json list what was adapted")})
    sine_frequency: float = field(default=0.0, metadata={"help": (
        "sinelora only: omega in delta W = sin(omega * B A) / g * alpha / r (SineLoRA, Ji et al., \"Efficient Learning "
        "With Sine-Activated Low-rank Matrices\", ICLR 2025, arXiv 2403.19243); 0 = 200, this project's default (the "
        "authors' code requires it explicitly: stages/student/sine_lora.py)")})
    sine_scale: float = field(default=0.0, metadata={"help": (
        "sinelora only: g in sin(omega * B A) / g; 0 = sqrt(in_features) of each adapted layer, as the SineLoRA "
        "authors' code does")})

    def __post_init__(self) -> None:
        require(self.variant in LORA_VARIANTS, f"train.lora.variant: {self.variant!r} not in {LORA_VARIANTS}")
        require(self.rank >= 1, f"train.lora.rank: must be >= 1, got {self.rank}")
        require(0.0 <= self.dropout < 1.0, f"train.lora.dropout: must be in [0, 1), got {self.dropout}")
        require(self.sine_frequency >= 0, f"train.lora.sine_frequency: must be >= 0 (0 = the default, 200), got {self.sine_frequency}")
        require(self.sine_scale >= 0, f"train.lora.sine_scale: must be >= 0 (0 = sqrt(in_features) per layer), got {self.sine_scale}")
        names = self.target_modules
        require(names == "all-linear" or (isinstance(names, list) and bool(names) and all(isinstance(n, str) and n for n in names)),
                 f"train.lora.target_modules: expected \"all-linear\" or a non-empty list of module names "
                 f"(e.g. [q_proj, v_proj]), got {names!r}")


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/demo/train", metadata={"help": (
        "the run's files: adapter/ (load with stages.student.adapters.load_adapter; stock PeftModel.from_pretrained for "
        "every variant but sinelora), config.yaml, cache_fingerprint.json, "
        "metrics.json, log.csv, tensorboard/, checkpoints/, and eval.json after eval")})
    method: str = field(default="sampled_tail", metadata={"help": (
        "the training method, one entry each in stages/student/methods.py (what it reads, scales, allows, logs): "
        "sampled_tail (the default; cached, unbiased: the top-k exact + tail draws; needs a cache.encoding with draws, "
        "as the default topk_idd_rel4q112_draws16; its logged kl is a noisy estimate, can dip below 0 near the start), "
        "tail, topk, full_kl (cached KL estimators; read any cache; tail is the default before issue 27), none (plain LoRA), live (exact "
        "masked KL, live teacher; not with pissa/olora), l2 (distance of the LoRA weights from init), lalora "
        "(Fisher-weighted distance, Laplace approximation)")})
    reg_weight: float = field(default=1.0, metadata={"help": (
        "lambda: CE + lambda * mean per-token KL, or CE + lambda * penalty (l2, lalora; once per step); unused by "
        "none. Logged as kl or penalty (log.csv, metrics.json final_kl / final_penalty)")})
    lora: LoraSettings = field(default_factory=LoraSettings, metadata={"help": "the adapter (peft)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of the loop (HF Trainer)"})
    lr_scheduler: str = field(default="cosine", metadata={"help": "any transformers scheduler name"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming the learning rate up"})
    weight_decay: float = field(default=0.0, metadata={"help": "the optimizer's weight decay (HF Trainer)"})
    batch_size: int = field(default=8, metadata={"help": (
        "sequences per micro-batch, per process (global batch = batch_size x grad_accum x processes)")})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the cache (fractions allowed)"})
    max_steps: int = field(default=0, metadata={"help": "> 0 overrides epochs"})
    seed: int = field(default=0, metadata={"help": "the run's random seed (HF Trainer)"})
    save_steps: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    logging_steps: int = field(default=5, metadata={"help": "one log.csv row (and report_to point) every N optimizer steps"})
    bf16: str = field(default="auto", metadata={"help": "auto (bf16 on CUDA) | true | false"})
    streaming: bool = field(default=False, metadata={"help": (
        "stream shards instead of memory-mapping them (huge caches; a remote cache is still copied to local disk first)")})
    fused_loss: str | bool = field(default="auto", metadata={"help": (
        "auto: chunked lm_head + loss from the last hidden state (no [B, T, V] logits; same loss and gradients) "
        "wherever it applies, else unfused, the reason in the run summary and metrics.json (live; a softcapped or "
        "scaled output head); true: fused or an error; false: never fused")})
    fused_chunk_size: int = field(default=0, metadata={"help": "fused_loss rows per chunk; 0 = auto (one fp32 [rows, V] buffer <= 1 GiB)"})
    allow_model_mismatch: bool = field(default=False, metadata={"help": (
        "train on a cache made by other weights (never other tokenizer)")})
    fisher_data: str = field(default="", metadata={"help": (
        "lalora only (stages/student/weight_penalties.py): the curvature's proxy data, SOURCE (retention) text, never "
        "the held-out retention set: jsonl/parquet/saved dataset with a \"text\" column (a chat \"messages\" or "
        "prompt/completion file counts only its trained parts); required for lalora")})
    fisher_examples: int = field(default=64, metadata={"help": (
        "lalora: the first N texts of fisher_data (one per-example gradient each); see fisher_batches")})
    fisher_batches: int = field(default=0, metadata={"help": (
        "lalora: proxy data as batches: the first fisher_batches x batch_size texts of fisher_data (LaLoRA studies 1 or 2); "
        "0 = fisher_examples texts (leave fisher_examples at 64 when this is set)")})
    fisher_max_length: int = field(default=256, metadata={"help": "lalora: tokens per Fisher text (truncated on the right)"})
    fisher_floor: float = field(default=0.1, metadata={"help": (
        "lalora: F += fisher_floor * mean(diag F) * I, every curvature: anchors A, whose Fisher is 0 at B = 0")})
    lalora_curvature: str = field(default="diag", metadata={"help": (
        "lalora's curvature (stages/student/curvature.py): diag (the empirical Fisher's diagonal) | kfac (one "
        "Kronecker block per lora_A / lora_B) | tri_kfac (kfac + each module's A-B cross block); not kfac/tri_kfac "
        "with randlora/sinelora")})
    curvature_dir: str = field(default="", metadata={"help": (
        "lalora: where curvatures are kept, keyed by model, adapter init, proxy data and curvature, so runs "
        "that differ only in lambda (or steps) compute it once; \"\" = <parent of output_dir>/curvature")})
    k: int = field(default=0, metadata={"help": "cached estimators: use the first k cached tokens (the teacher's top k); 0 = all"})
    quantization: str = field(default="none", metadata={"help": (
        "none | 4bit: QLoRA, the base's linear layers (not the output head) in NF4 through bitsandbytes (extra "
        "`quant`: pip install -e '.[quant]'; CPU and CUDA from 0.50), matmuls in the bf16/fp32 compute dtype; the "
        "cache of the full-precision teacher is used as is (same weight files, same fingerprint); not with "
        "pissa/olora, whose init rewrites the base weights (stages/student/adapters.py make_student); with method "
        "live the in-step teacher is the 4-bit base itself (adapter disabled). Recorded in metrics.json "
        "(quantization). Tested on CPU: 2 steps train, the adapter moves")})
    report_to: str | list[str] = field(default="tensorboard", metadata={"help": (
        "tensorboard (scalars in <output_dir>/tensorboard) | wandb | mlflow (each when installed; otherwise an "
        "error naming the package) | none, or a list; saved resolved in the run's config.yaml (docs/cli.md, Logs)")})
    trainer_args: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "more TrainingArguments fields, e.g. {gradient_checkpointing: true, optim: adamw_torch_fused}, each checked "
        "against the installed transformers (an unknown key is named, with the closest field); keys the project "
        "sets are refused with a pointer (learning_rate -> train.learning_rate, ...) or the reason "
        "(remove_unused_columns, label_names, use_cpu, average_tokens_across_devices, "
        "accelerator_config.{dispatch,split}_batches, ...: stages/student/trainer_args.py). gradient_checkpointing: "
        "true works with every LoRA variant (non-reentrant, same loss and gradients: tested). On --resume only the "
        "checkpointing, dataloader and save-count keys may change")})

    @property
    def fisher_texts(self) -> int:
        """How many texts of fisher_data lalora's curvature reads: fisher_batches x batch_size, else fisher_examples."""
        return self.fisher_batches * self.batch_size if self.fisher_batches else self.fisher_examples

    def __post_init__(self) -> None:
        method = get_method(self.method)
        for key in method.requires:
            require(bool(getattr(self, key)), f"train.{key}: required by method {self.method!r}")
        require(self.fisher_examples >= 1, f"train.fisher_examples: must be >= 1, got {self.fisher_examples}")
        require(self.fisher_max_length >= 2, f"train.fisher_max_length: must be >= 2, got {self.fisher_max_length}")
        require(self.fisher_floor >= 0, f"train.fisher_floor: must be >= 0, got {self.fisher_floor}")
        require(self.fisher_batches >= 0, f"train.fisher_batches: must be >= 0 (0 = fisher_examples texts), got {self.fisher_batches}")
        require(self.fisher_batches == 0 or self.fisher_examples == 64,
                f"train.fisher_batches={self.fisher_batches} and train.fisher_examples={self.fisher_examples}: set one of them "
                "(fisher_batches counts batches of batch_size texts; leave fisher_examples at 64)")
        require(self.lalora_curvature in LALORA_CURVATURES,
                f"train.lalora_curvature: {self.lalora_curvature!r} not in {'|'.join(LALORA_CURVATURES)}")
        require(self.method != "lalora" or self.lalora_curvature == "diag" or self.lora.variant not in NO_KFAC,
                f"train.lalora_curvature={self.lalora_curvature}: not with train.lora.variant={self.lora.variant} "
                f"({NO_KFAC.get(self.lora.variant, '')}); use lalora_curvature=diag")
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
        if self.fused_loss == "true":
            check_fused(method)
        require(self.fused_chunk_size >= 0, f"train.fused_chunk_size: must be >= 0, got {self.fused_chunk_size}")
        require(self.quantization in QUANTIZATIONS, f"train.quantization: {self.quantization!r} not in {'|'.join(QUANTIZATIONS)}")
        require(self.quantization == "none" or self.lora.variant not in MUTATES_BASE,
                f"train.quantization={self.quantization}: not with train.lora.variant={self.lora.variant} (its init writes the "
                "residual W - BA into the base weights, which NF4 would round, so the saved stock LoRA would no longer add up)")
        self.report_to = normalize_report_to(self.report_to)
        check_trainer_args(self.trainer_args)
