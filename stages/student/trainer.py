"""Stage two's loop: the HF `Trainer` with CE + lambda * Mask-the-Target KL as its loss.

    python -m pipeline train --config configs/demo.yaml      (wired by stages/student/runner.py)

Methods (`train.method`, registered in stages/student/methods.py; docs/design.md §4):
    none                 CE only (plain LoRA)
    tail | topk | full_kl  KL from the cached teacher arrays (`cached_kl`)
    live                 exact masked KL against the same peft model with its adapter disabled,
                         computed in the step (reference and speed baseline; ignores the cache
                         arrays, uses only the labels)
    l2 | lalora          weight-space baselines, no KL: CE + reg_weight * penalty on the LoRA weights
                         (stages/student/weight_penalties.py; `CacheTrainer.penalty`, added once per
                         optimizer step; logged as `penalty`, unweighted)
A method's regularizer gets the teacher its registry entry names: the collated cache arrays, the
logits of the same model with its adapter disabled (live), or nothing. The runner (stages/student/runner.py)
looks the method up once and passes the `Method` down: `dataset_columns(method, encoding)`,
`resolve_fused_loss(setting, method, model)`, `build_trainer(model, dataset, collator, train, method,
num_rows)`. Everything here takes the `train:` section (`TrainConfig`) and the few values it needs,
never the whole config; the runner writes config.yaml.

Gradient accumulation (transformers 5.19, read from trainer.py): before each optimizer step the
Trainer counts `num_items_in_batch` = labels[..., 1:] != -100 over ALL the step's micro-batches
(summed over processes when `average_tokens_across_devices`), but only if it believes the model
takes loss kwargs. `CacheTrainer` forces that counting on, passes the count to
`regularized_loss(num_items=...)` and sets `loss_is_scaled_for_ga = True`, so the Trainer does
not divide by the accumulation steps again: the summed micro-batch gradients equal the full-batch
gradient exactly. Under DDP the loss is multiplied by the process count (as the stock
`compute_loss` does) because DDP averages gradients while the count is global.

Fused loss (`train.fused_loss=auto`, the default: wherever it applies, `resolve_fused_loss`; methods
with `supports_fused`, all but `live`, and plain linear output heads): the model runs with logits for no
position (stages/student/lm_head.py), and CE + KL come from the last hidden state at the labelled
positions and the lm_head weight in row chunks (stages/student/fused_loss.py): the same loss and
gradients without the [B, T, V] logits and their float32 copies.

Logs (progress bar, trainer_state.json, log.csv): per logging window the Trainer's `loss` (mean of
the step losses) plus `ce` and the method's regularizer (`Method.log_key`: `kl` per labelled token,
or `penalty` per step, over the window, summed over processes), `tokens_per_s` (non-padding
input tokens) and, for a KL method, `binary_share`: the share of the full KL that is the binary term
KL(Bern(p_y) || Bern(q_y)), the part masking drops (loss.py `binary_kl`). The model is always called
without labels, so it never computes a loss of its own.
With `train.report_to: tensorboard` (the default) the same logs go to <run>/tensorboard as `train/<key>`
scalars (`RunTensorBoardCallback`, transformers' own pointed there); wandb/mlflow when asked.

Run directory: checkpoints/checkpoint-N (every save_steps; the 2 newest kept), log.csv, tensorboard/,
and at the end adapter/, cache_fingerprint.json, metrics.json (config.yaml: the runner, from the start).
"""
from __future__ import annotations

import csv
import json
import math
import os
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import TensorBoardCallback

from stages.common.tensorboard_log import tensorboard_dir
from stages.student.adapters import adapted_modules, save_adapter
from stages.student.lm_head import output_head
from stages.student.loss_mixin import CacheLossMixin
from stages.student.methods import Method, check_fused
from stages.student.settings import TrainConfig
from stages.student.trainer_args import check_reporters_installed
from storage_schemas import SEQUENCE_COLUMNS, Manifest, teacher_columns

__all__ = [
    "CacheTrainer", "CsvLogCallback", "LogLastStepCallback", "RunTensorBoardCallback",
    "dataset_columns", "use_bf16", "training_arguments", "build_trainer", "train_and_save", "last_checkpoint", "run_metrics",
    "cache_fingerprint", "write_run_files", "CHECKPOINT_DIR",
]

CHECKPOINT_DIR = "checkpoints"


def dataset_columns(method: Method, encoding: str) -> list[str]:
    """Cache columns a method reads from a cache of `encoding`: the teacher arrays only for a method
    that `reads_cache` (`none`, `live`, `l2`, `lalora` never decode them)."""
    return list(SEQUENCE_COLUMNS) + (list(teacher_columns(encoding)) if method.reads_cache else [])


def use_bf16(setting: str) -> bool:
    """`auto`: bf16 mixed precision on CUDA devices that support it, float32 elsewhere."""
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return setting == "true"


# --- the Trainer -------------------------------------------------------------------------------
class CacheTrainer(CacheLossMixin, Trainer):
    """`Trainer` whose loss is `batch_loss`; logs per-token CE, KL and tokens/s per logging window.

    All of it is `CacheLossMixin` (stages/student/loss_mixin.py): the same code a user's own Trainer
    subclass or TRL's `CacheSFTTrainer` mixes in."""


# --- callbacks ---------------------------------------------------------------------------------
class CsvLogCallback(TrainerCallback):
    """Appends every training-window log to `log.csv`; on resume drops rows past the checkpoint
    (the killed run logged them; this run logs them again)."""

    FIELDS = ("step", "epoch", "loss", "ce", "kl", "penalty", "binary_share", "learning_rate", "grad_norm", "tokens_per_s",
              "elapsed_s")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path, self.start = Path(path), time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()
        if not state.is_world_process_zero:
            return
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= state.global_step]
        with open(self.path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "ce" not in logs:
            return
        row = {name: logs.get(name, "") for name in self.FIELDS}
        row.update(step=state.global_step, elapsed_s=round(time.time() - self.start, 3))
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.FIELDS).writerow(row)


class RunTensorBoardCallback(TensorBoardCallback):
    """transformers' TensorBoardCallback writing into <run>/tensorboard; a resumed session first purges
    the steps after its checkpoint, which the killed session may have logged.

    transformers 5 has no TrainingArguments.logging_dir: the stock callback writes to $TENSORBOARD_LOGGING_DIR,
    else to <args.output_dir>/runs/<date>_<host> (here inside checkpoints/); the environment variable
    would leak to every later run of the process. On resume the writer's `purge_step` records a restart
    at the first re-logged step, so TensorBoard drops the old points from there (one point per step)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        super().__init__()
        self.logging_dir = str(log_dir)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.tb_writer is None and state.global_step > 0:  # resumed
            from torch.utils.tensorboard import SummaryWriter

            self.tb_writer = SummaryWriter(log_dir=self.logging_dir, purge_step=state.global_step + 1)
        return super().on_train_begin(args, state, control, **kwargs)


class LogLastStepCallback(TrainerCallback):
    """Log at the final step too, so the last window's CE/KL reach the logs and metrics."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


# --- setup -------------------------------------------------------------------------------------
def _project_arguments(train: TrainConfig, run_dir: Path, max_steps: int) -> dict[str, Any]:
    """The TrainingArguments the project sets (stages/student/trainer_args.py names the ones a config
    cannot override, and why)."""
    return dict(
        output_dir=str(run_dir / CHECKPOINT_DIR),
        per_device_train_batch_size=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        num_train_epochs=train.epochs, max_steps=max_steps,
        learning_rate=train.learning_rate, lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=train.weight_decay, seed=train.seed, bf16=use_bf16(train.bf16),
        save_strategy="steps", save_steps=train.save_steps, save_total_limit=2,
        logging_strategy="steps", logging_steps=train.logging_steps, logging_first_step=True,
        include_num_input_tokens_seen="non_padding",
        remove_unused_columns=False,  # the collator's teacher arrays are not forward() arguments
        # The teacher arrays are [N, k] (labelled positions), not batch-major: accelerate must never
        # slice a collated batch along dim 0 (it does by default for iterable datasets).
        accelerator_config={"dispatch_batches": False, "split_batches": False},
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every forward
        report_to=check_reporters_installed(train.report_to) or "none",
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, accelerate sets up DDP (gloo) under torchrun only when told it runs on CPU;
        # otherwise every process would silently train on its own.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )


def training_arguments(train: TrainConfig, run_dir: Path, num_rows: int, streaming: bool = False) -> TrainingArguments:
    """`TrainingArguments` from the `train:` section, `train.trainer_args` applied on top (validated by
    TrainConfig, which refuses the keys the project sets). A streamed dataset has no length, so its
    step count is derived from the manifest's row count. ValueError when a `train.report_to`
    integration is not installed."""
    if not 0.0 <= train.warmup_ratio < 1.0:  # transformers reads a value >= 1 as a step count
        raise ValueError(f"train.warmup_ratio: must be in [0, 1), got {train.warmup_ratio}")
    max_steps = train.max_steps if train.max_steps > 0 else -1
    if streaming and max_steps < 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        max_steps = math.ceil(train.epochs * math.ceil(num_rows / (train.batch_size * train.grad_accum * world)))
    args = _project_arguments(train, run_dir, max_steps)
    extra = dict(train.trainer_args)
    if extra.get("gradient_checkpointing"):  # non-reentrant: the safe choice with peft (also transformers 5's default)
        extra.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    # a given accelerator_config keeps the project's dispatch/split settings (trainer_args refuses those keys)
    extra["accelerator_config"] = {**extra.get("accelerator_config", {}), **args["accelerator_config"]}
    return TrainingArguments(**{**args, **extra})


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under run_dir/checkpoints, or None.

    The Trainer writes trainer_state.json last, so a checkpoint without a readable one was
    interrupted mid-save (e.g. SIGKILL) and is skipped rather than resumed from.
    """
    found = []
    for path in (Path(run_dir) / CHECKPOINT_DIR).glob("checkpoint-*"):
        step = path.name.rsplit("-", 1)[-1]
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        if step.isdigit():
            found.append((int(step), path))
    return max(found)[1] if found else None


# --- outputs -----------------------------------------------------------------------------------
def _peak_memory_mib() -> dict[str, float]:
    # ru_maxrss is KiB on Linux: the process's high-water mark, model and data included.
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run_metrics(trainer: CacheTrainer, wall_s: float, resumed_from: Path | None) -> dict[str, Any]:
    """Final figures: the last logging window's CE/KL/loss, CE at step 1 (the base model on the first
    batch; B = 0 there for lora/rslora/dora/sinelora, lambda = 0 for randlora) vs at the end, counts, speed and
    peak memory."""
    windows = [h for h in trainer.state.log_history if "ce" in h]
    first, last = (windows[0], windows[-1]) if windows else ({}, {})
    return {
        "method": trainer.method.name, "reg_weight": trainer.reg_weight,
        "final_ce": last.get("ce"), "final_kl": last.get("kl"), "final_penalty": last.get("penalty"),
        "final_binary_share": last.get("binary_share"),
        "final_loss": last.get("loss"),
        "ce_start": first.get("ce"), "ce_end": last.get("ce"),
        "steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
        "session_tokens": trainer.session_tokens, "wall_time_s": wall_s,
        "tokens_per_s": trainer.session_tokens / max(wall_s, 1e-9),
        **_peak_memory_mib(),
        "resumed_from": str(resumed_from) if resumed_from else None,
    }


def cache_fingerprint(manifest: Manifest) -> dict[str, Any]:
    """What identifies the training data: the manifest's teacher/tokenizer/dataset/settings + token hash."""
    parts = {name: asdict(getattr(manifest, name)) for name in ("teacher", "tokenizer", "dataset", "settings")}
    return {**parts, "token_ids_sha256": manifest.token_ids_sha256}


def write_run_files(trainer: CacheTrainer, run_dir: Path, manifest: Manifest, metrics: dict[str, Any],
                    initial_adapter: Path | None) -> None:
    """adapter/, cache_fingerprint.json and metrics.json (main process only; metrics.json last: it marks
    a finished run)."""
    if not trainer.is_world_process_zero():
        return
    save_adapter(trainer.model, run_dir / "adapter", initial_adapter)
    (run_dir / "cache_fingerprint.json").write_text(json.dumps(cache_fingerprint(manifest), indent=2))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def train_and_save(trainer: CacheTrainer, train: TrainConfig, manifest: Manifest, resume_from: Path | None,
                   initial_adapter: Path | None) -> dict[str, Any]:
    """Run `trainer.train` (from `resume_from` if given), then write the run files into `train.output_dir`;
    the metrics."""
    start, run_dir = time.time(), Path(train.output_dir)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = run_metrics(trainer, time.time() - start, resume_from)
    metrics["adapter_dir"] = str(run_dir / "adapter")
    metrics["adapted_modules"] = adapted_modules(trainer.model)  # leaf name -> count: what train.lora.target_modules matched
    metrics["fused_loss"] = trainer.fused_loss
    metrics["fused_loss_reason"] = getattr(trainer, "fused_loss_reason", "")
    metrics["quantization"] = train.quantization  # none | 4bit (QLoRA): the base the adapter trained on
    if getattr(trainer.penalty, "report", None):  # lalora: its curvature's key, file and cost
        metrics["curvature"] = trainer.penalty.report
    write_run_files(trainer, run_dir, manifest, metrics, initial_adapter)
    return metrics


def resolve_fused_loss(setting: str, method: Method, peft_model: torch.nn.Module) -> tuple[bool, str]:
    """(run the fused loss?, why not) for `train.fused_loss` = auto | true | false. `auto` runs it
    wherever it applies; where it cannot (a method that needs the full logits, e.g. `live`; an output
    head with a softcap or scale, or not a plain Linear) it falls back, and the reason is returned.
    `true` raises ValueError there instead."""
    if setting == "false":
        return False, "train.fused_loss=false"
    if setting == "true":
        check_fused(method)
    if not method.supports_fused:
        return False, f"method {method.name!r} needs the full [B, T, V] logits"
    try:
        output_head(peft_model)
    except ValueError as err:
        if setting == "true":
            raise
        return False, str(err).removeprefix("train.fused_loss: ").split("; set train.fused_loss")[0]
    return True, ""


def build_trainer(model, dataset, collator, train: TrainConfig, method: Method, num_rows: int,
                  callbacks: Sequence[TrainerCallback] = ()) -> CacheTrainer:
    """The `CacheTrainer` for `train` and its resolved `method`, with the CSV log and last-step logging callbacks."""
    run_dir = Path(train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fused, why_not = resolve_fused_loss(train.fused_loss, method, model)
    trainer = CacheTrainer(
        model=model, args=training_arguments(train, run_dir, num_rows, streaming=train.streaming),
        train_dataset=dataset, data_collator=collator,
        callbacks=[CsvLogCallback(run_dir / "log.csv"), LogLastStepCallback(), *callbacks],
        method=method, reg_weight=train.reg_weight, variant=train.lora.variant,
        fused_loss=fused, fused_chunk_size=train.fused_chunk_size,
    )
    trainer.fused_loss_reason = why_not  # "" when fused; the run summary and metrics.json say why not
    _point_tensorboard(trainer, tensorboard_dir(run_dir))
    if trainer.args.gradient_checkpointing:
        # peft: the frozen embeddings' output must require grad or a reentrant checkpoint cuts the graph
        # (transformers 5.19 also does this in gradient_checkpointing_enable; done here whatever the version)
        model.enable_input_require_grads()
    return trainer


def _point_tensorboard(trainer: Trainer, log_dir: Path) -> None:
    """Replace the TensorBoardCallback that report_to: tensorboard added by a `RunTensorBoardCallback`
    writing into `log_dir`, in the same place among the callbacks."""
    callbacks = trainer.callback_handler.callbacks
    for i, callback in enumerate(callbacks):
        if type(callback) is TensorBoardCallback:
            callbacks[i] = RunTensorBoardCallback(log_dir)
