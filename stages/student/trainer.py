"""Stage two's loop: the HF `Trainer` with CE + lambda * Mask-the-Target KL as its loss.

    python -m pipeline train --config configs/demo.yaml      (wired by stages/train.py)

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
logits of the same model with its adapter disabled (live), or nothing.

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
or `penalty` per step, over the window, summed over processes) and `tokens_per_s` (non-padding
input tokens). The model is always called without labels, so it never computes a loss of its own.

Run directory: checkpoints/checkpoint-N (every save_steps; the 2 newest kept), log.csv,
and at the end adapter/, config.yaml, cache_fingerprint.json, metrics.json.
"""
from __future__ import annotations

import contextlib
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

from stages.settings import StageConfig, save_config
from stages.student.adapters import adapted_modules, save_adapter
from stages.student.collator import IGNORE_INDEX
from stages.student.fused_loss import auto_chunk_size, chunked_regularized_loss
from stages.student.lm_head import final_hidden_state, output_head
from stages.student.loss import CachedTeacher, LossParts, regularized_loss
from stages.student.methods import Method, check_variant, get_method
from stages.student.settings import TrainConfig
from stages.student.weight_penalties import WeightPenalty
from storage_schemas import SEQUENCE_COLUMNS, Manifest, teacher_columns

__all__ = [
    "CacheTrainer", "CsvLogCallback", "LogLastStepCallback", "batch_loss", "fused_batch_loss", "dataset_columns", "use_bf16",
    "training_arguments", "build_trainer", "train_and_save", "last_checkpoint", "run_metrics", "cache_fingerprint",
    "write_run_files", "CHECKPOINT_DIR",
]

CHECKPOINT_DIR = "checkpoints"


def dataset_columns(method: str, encoding: str) -> list[str]:
    """Cache columns a method reads from a cache of `encoding`: the teacher arrays only for a method
    that `reads_cache` (`none`, `live`, `l2`, `lalora` never decode them)."""
    return list(SEQUENCE_COLUMNS) + (list(teacher_columns(encoding)) if get_method(method).reads_cache else [])


def use_bf16(setting: str) -> bool:
    """`auto`: bf16 mixed precision on CUDA devices that support it, float32 elsewhere."""
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return setting == "true"


# --- the loss of one micro-batch ---------------------------------------------------------------
def _labelled(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], labels [B, T] -> (logits [N, V], targets [N]) at the labelled positions,
    row-major: the order of the collator's teacher arrays."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask], labels[:, 1:][mask]


def _cached_teacher(inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> CachedTeacher:
    teacher = CachedTeacher(inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"], inputs["teacher_target_logprob"])
    if teacher.target_logprob.shape[0] != targets.shape[0]:
        raise ValueError(f"{targets.shape[0]} labelled positions but {teacher.target_logprob.shape[0]} cached ones")
    return teacher


def batch_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: str, kl_weight: float,
               num_items: int | torch.Tensor | None = None, peft_model: torch.nn.Module | None = None,
               fused: bool = False, chunk_size: int = 0) -> LossParts:
    """CE + kl_weight * the method's per-token regularizer (mean; none: CE only) for one collated
    micro-batch (keys as `CacheCollator` returns them). A weight penalty is added by `CacheTrainer`.

    The model is called WITHOUT labels so it does not compute (and allocate for) its own loss.
    `peft_model` is the unwrapped PeftModel used for the `live` teacher (defaults to `model`).
    `fused`: the same loss via `fused_batch_loss` (no [B, T, V] logits); `chunk_size` its rows per chunk.
    """
    if fused:
        return fused_batch_loss(model, inputs, method, kl_weight, num_items, peft_model, chunk_size)
    labels, spec = inputs["labels"], get_method(method)
    if spec.needs_live_teacher:  # teacher first, so its full [B, T, V] logits are freed before backward
        teacher_model = peft_model if peft_model is not None else model
        with teacher_model.disable_adapter(), torch.no_grad():
            teacher_full = teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        teacher_logits, _ = _labelled(teacher_full, labels)
        del teacher_full
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    student_logits, targets = _labelled(logits, labels)
    kl = None  # none, l2, lalora: no per-token term (CacheTrainer adds a penalty)
    if spec.regularizer is not None:
        teacher = teacher_logits if spec.needs_live_teacher else _teacher(spec, inputs, targets)
        kl = spec.regularizer(student_logits, targets, teacher)
    return regularized_loss(student_logits, targets, kl, kl_weight, num_items=num_items)


def _teacher(method: Method, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> CachedTeacher | None:
    """The cached teacher arrays for a method that reads them, else None."""
    return _cached_teacher(inputs, targets) if method.reads_cache else None


def fused_batch_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: str, kl_weight: float,
                     num_items: int | torch.Tensor | None = None, peft_model: torch.nn.Module | None = None,
                     chunk_size: int = 0) -> LossParts:
    """`batch_loss` from the last hidden state at the labelled positions and the lm_head weight, through
    `chunked_regularized_loss` (fused_loss.py): the [B, T, V] logits are never built. `chunk_size` 0 = auto."""
    spec = get_method(method)
    if not spec.supports_fused:
        raise ValueError(f"train.fused_loss: not supported with method {method!r} (its regularizer needs full logits)")
    peft_model = peft_model if peft_model is not None else model
    hidden, autocast = final_hidden_state(model, peft_model, inputs["input_ids"], inputs["attention_mask"])
    hidden, targets = _labelled(hidden, inputs["labels"])
    weight, bias = output_head(peft_model)
    teacher = _teacher(spec, inputs, targets) if spec.regularizer is not None else None  # none, l2, lalora: CE
    # The lm_head's dtype inside the forward (accelerate's autocast may cover only the forward).
    context = torch.autocast(hidden.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        return chunked_regularized_loss(hidden, weight, targets, teacher, kl_weight, spec.fused_estimator, num_items,
                                        chunk_size or auto_chunk_size(weight.shape[0]), bias)


# --- the Trainer -------------------------------------------------------------------------------
class CacheTrainer(Trainer):
    """`Trainer` whose loss is `batch_loss`; logs per-token CE, KL and tokens/s per logging window."""

    loss_is_scaled_for_ga = True  # compute_loss normalizes by the whole step's labelled-token count

    def __init__(self, *args: Any, method: str, reg_weight: float, variant: str = "lora",
                 penalty: WeightPenalty | None = None, fused_loss: bool = False, fused_chunk_size: int = 0,
                 **kwargs: Any) -> None:
        check_variant(method, variant)
        super().__init__(*args, **kwargs)
        self.method, self.reg_weight = get_method(method), reg_weight
        self.fused_loss, self.fused_chunk_size = fused_loss, fused_chunk_size  # see fused_batch_loss
        # l2/lalora: R(theta), set (anchored at init) by stages.train before training; see weight_penalties
        self.penalty = penalty
        # Make the Trainer count labels[:, 1:] != -100 over the accumulated micro-batches whatever
        # the model class says: our labels always follow the causal-shift convention.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._window: torch.Tensor | None = None  # on device: CE sum, KL sum, labelled, input tokens
        self._window_start = time.time()
        self.session_tokens = 0

    def train(self, *args: Any, **kwargs: Any):
        self._window_start = time.time()  # tokens/s of the first window excludes setup time
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the step loss, already scaled for accumulation (see module doc)."""
        parts = batch_loss(model, inputs, self.method.name, self.reg_weight, num_items_in_batch,
                           peft_model=self.accelerator.unwrap_model(model),
                           fused=self.fused_loss, chunk_size=self.fused_chunk_size)
        loss = parts.loss
        if num_items_in_batch is None and model.training:
            loss = loss / self.current_gradient_accumulation_steps  # a per-micro-batch mean
        elif num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
        if self.method.penalty is not None:
            if self.penalty is None:
                raise RuntimeError(f"method {self.method.name!r}: CacheTrainer.penalty was never set (build_penalty)")
            # One penalty per optimizer step: each of the step's micro-batches adds its share. Added after
            # the DDP rescaling: every process adds the same penalty and DDP averages it back to one.
            value = self.penalty()
            share = self.current_gradient_accumulation_steps if model.training else 1
            loss = loss + self.reg_weight * value / share
            # LossParts.kl carries the method's regularizer: here the penalty, logged as `penalty`
            parts = LossParts(loss=loss, ce=parts.ce, kl=value.detach(), n_tokens=parts.n_tokens)
        if model.training:  # stays on device: no host sync per micro-batch
            n = parts.ce.new_tensor(parts.n_tokens, dtype=torch.float64)
            update = torch.stack([parts.ce.double() * n, parts.kl.double() * n, n, inputs["attention_mask"].sum().double()])
            self._window = update if self._window is None else self._window + update
        return (loss, {"ce": parts.ce, self.method.log_key: parts.kl}) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-window log (the end-of-train summary says "train_loss")
            logs.update(self._drain_window())
        super().log(logs, start_time)

    def _drain_window(self) -> dict[str, float]:
        """Per-token CE, the regularizer (under `Method.log_key`) and input tokens/s since the last log;
        summed over processes."""
        window = self._window if self._window is not None else torch.zeros(4, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        ce_sum, kl_sum, n, tokens = window.tolist()
        now = time.time()
        elapsed, self._window_start = now - self._window_start, now
        self._window = None
        self.session_tokens += int(tokens)
        return {"ce": ce_sum / max(n, 1.0), self.method.log_key: kl_sum / max(n, 1.0), "tokens_per_s": tokens / max(elapsed, 1e-9)}


# --- callbacks ---------------------------------------------------------------------------------
class CsvLogCallback(TrainerCallback):
    """Appends every training-window log to `log.csv`; on resume drops rows past the checkpoint
    (the killed run logged them; this run logs them again)."""

    FIELDS = ("step", "epoch", "loss", "ce", "kl", "penalty", "learning_rate", "grad_norm", "tokens_per_s", "elapsed_s")

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


class LogLastStepCallback(TrainerCallback):
    """Log at the final step too, so the last window's CE/KL reach the logs and metrics."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control


# --- setup -------------------------------------------------------------------------------------
def training_arguments(train: TrainConfig, run_dir: Path, num_rows: int, streaming: bool = False) -> TrainingArguments:
    """`TrainingArguments` from the stage config. A streamed dataset has no length, so its step
    count is derived from the manifest's row count."""
    if not 0.0 <= train.warmup_ratio < 1.0:  # transformers reads a value >= 1 as a step count
        raise ValueError(f"train.warmup_ratio: must be in [0, 1), got {train.warmup_ratio}")
    max_steps = train.max_steps if train.max_steps > 0 else -1
    if streaming and max_steps < 0:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        max_steps = math.ceil(train.epochs * math.ceil(num_rows / (train.batch_size * train.grad_accum * world)))
    return TrainingArguments(
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
        report_to="none", dataloader_pin_memory=torch.cuda.is_available(),
        # Without CUDA, accelerate sets up DDP (gloo) under torchrun only when told it runs on CPU;
        # otherwise every process would silently train on its own.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )


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
    batch; B = 0 there for lora/rslora/dora) vs at the end, counts, speed and peak memory."""
    windows = [h for h in trainer.state.log_history if "ce" in h]
    first, last = (windows[0], windows[-1]) if windows else ({}, {})
    return {
        "method": trainer.method.name, "reg_weight": trainer.reg_weight,
        "final_ce": last.get("ce"), "final_kl": last.get("kl"), "final_penalty": last.get("penalty"),
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


def write_run_files(trainer: CacheTrainer, config: StageConfig, manifest: Manifest, metrics: dict[str, Any],
                    initial_adapter: Path | None) -> None:
    """adapter/, config.yaml, cache_fingerprint.json and metrics.json (main process only)."""
    run_dir = Path(config.train.output_dir)
    if not trainer.is_world_process_zero():
        return
    save_adapter(trainer.model, run_dir / "adapter", initial_adapter)
    save_config(config, run_dir / "config.yaml")
    (run_dir / "cache_fingerprint.json").write_text(json.dumps(cache_fingerprint(manifest), indent=2))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))


def train_and_save(trainer: CacheTrainer, config: StageConfig, manifest: Manifest, resume_from: Path | None,
                   initial_adapter: Path | None) -> dict[str, Any]:
    """Run `trainer.train` (from `resume_from` if given), then write the run files; the metrics."""
    start = time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    metrics = run_metrics(trainer, time.time() - start, resume_from)
    metrics["adapter_dir"] = str(Path(config.train.output_dir) / "adapter")
    metrics["adapted_modules"] = adapted_modules(trainer.model)  # leaf name -> count: what train.lora.target_modules matched
    metrics["fused_loss"] = trainer.fused_loss
    metrics["fused_loss_reason"] = getattr(trainer, "fused_loss_reason", "")
    write_run_files(trainer, config, manifest, metrics, initial_adapter)
    return metrics


def resolve_fused_loss(setting: str, method: str, peft_model: torch.nn.Module) -> tuple[bool, str]:
    """(run the fused loss?, why not) for `train.fused_loss` = auto | true | false. `auto` runs it
    wherever it applies; where it cannot (a method that needs the full logits, e.g. `live`; an output
    head with a softcap or scale, or not a plain Linear) it falls back, and the reason is returned.
    `true` raises ValueError there instead."""
    if setting == "false":
        return False, "train.fused_loss=false"
    if not get_method(method).supports_fused:
        if setting == "true":
            raise ValueError(f"train.fused_loss: not supported with method {method!r} (its regularizer needs full logits)")
        return False, f"method {method!r} needs the full [B, T, V] logits"
    try:
        output_head(peft_model)
    except ValueError as err:
        if setting == "true":
            raise
        return False, str(err).removeprefix("train.fused_loss: ").split("; set train.fused_loss")[0]
    return True, ""


def build_trainer(model, dataset, collator, config: StageConfig, num_rows: int,
                  callbacks: Sequence[TrainerCallback] = ()) -> CacheTrainer:
    """The `CacheTrainer` for this config, with the CSV log and last-step logging callbacks."""
    train, run_dir = config.train, Path(config.train.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fused, why_not = resolve_fused_loss(train.fused_loss, train.method, model)
    trainer = CacheTrainer(
        model=model, args=training_arguments(train, run_dir, num_rows, streaming=train.streaming),
        train_dataset=dataset, data_collator=collator,
        callbacks=[CsvLogCallback(run_dir / "log.csv"), LogLastStepCallback(), *callbacks],
        method=train.method, reg_weight=train.reg_weight, variant=train.lora.variant,
        fused_loss=fused, fused_chunk_size=train.fused_chunk_size,
    )
    trainer.fused_loss_reason = why_not  # "" when fused; the run summary and metrics.json say why not
    return trainer
