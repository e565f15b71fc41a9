"""The project's training loss as a `Trainer` mixin: CE + reg_weight * regularizer from the cache columns.

    class MyTrainer(CacheLossMixin, Trainer): ...          # or transformers' Trainer itself:
    trainer = MyTrainer(model=peft_model, args=args, train_dataset=data.dataset, data_collator=data.collator,
                        method="tail", reg_weight=1.0)     # data = stages.student.library.load_cache(...)

    parts = batch_loss(model, inputs, get_method("tail"), reg_weight=1.0)   # one micro-batch -> LossParts

`CacheLossMixin.compute_loss` takes the collated cache columns (`CacheCollator`: input_ids, attention_mask,
labels and the teacher arrays [N, k] of the N labelled positions) out of the batch, runs the model itself
and returns `batch_loss`: CE + reg_weight * the method's per-token regularizer, normalized by the step's
labelled-token count. HF's `compute_loss_func` cannot do this: it sees the model outputs and the labels,
never the batch, so it cannot carry the teacher arrays. The same code is the CLI's `CacheTrainer`
(stages/student/trainer.py, `class CacheTrainer(CacheLossMixin, Trainer)`) and TRL's `CacheSFTTrainer`
(stages/student/trl_trainer.py), so all three give the same loss on the same batch.

The mixin takes `method` as a `Method` (stages/student/methods.py) or its name, looked up once at
construction; `batch_loss` and `fused_batch_loss` take the `Method` itself. They return `LossParts`
(stages/student/loss.py): the loss, and apart, for logging, the mean CE, the mean per-token regularizer
and the weight penalty.

    fused_loss=False   the model returns the [B, T, V] logits; `regularized_loss` on the labelled rows
    fused_loss=True    no logits: the last hidden state and the lm_head weight in row chunks
                       (`fused_batch_loss`; the methods with `supports_fused`, plain Linear heads)

Gradient accumulation, DDP scaling and the per-window logs (`ce`, the regularizer under
`Method.log_key`, `tokens_per_s`) are described in stages/student/trainer.py's docstring. Weight
penalties (methods l2/lalora) enter through `CacheLossMixin.penalty`, a `WeightPenalty` the caller builds
and anchors at the initial weights (`stages.student.methods.build_penalty`) before training; a penalty
method without one raises at the first step.

The Trainer's arguments must keep `remove_unused_columns=False` (the teacher arrays and loss_mask are not
`forward()` arguments: the Trainer would drop them before the collator sees them); the mixin refuses
otherwise. With a streamed (iterable) dataset also set `accelerator_config={"dispatch_batches": False,
"split_batches": False}`: the teacher arrays are [N, k], not batch-major, and must never be sliced on dim 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
import torch.nn.functional as F

from stages.student.collator import IGNORE_INDEX
from stages.student.fused_loss import auto_chunk_size, chunked_regularized_loss
from stages.student.lm_head import final_hidden_state, output_head
from stages.student.loss import CachedTeacher, LossParts, regularized_loss
from stages.student.methods import Method, as_method, check_fused, check_variant
from stages.student.weight_penalties import WeightPenalty

__all__ = ["CacheLossMixin", "batch_loss", "fused_batch_loss", "labelled_positions"]


# --- the loss of one micro-batch ---------------------------------------------------------------
def labelled_positions(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, T, V], labels [B, T] -> (logits [N, V], targets [N]) at the labelled positions,
    row-major: the order of the collator's teacher arrays."""
    mask = labels[:, 1:] != IGNORE_INDEX
    return logits[:, :-1][mask], labels[:, 1:][mask]


def _cached_teacher(inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> CachedTeacher:
    teacher = CachedTeacher(inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"], inputs["teacher_target_logprob"],
                            inputs.get("teacher_draw_ids"), inputs.get("teacher_tail_entropy"))
    if teacher.target_logprob.shape[0] != targets.shape[0]:
        raise ValueError(f"{targets.shape[0]} labelled positions but {teacher.target_logprob.shape[0]} cached ones")
    return teacher


def batch_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: Method, reg_weight: float,
               num_items: int | torch.Tensor | None = None, peft_model: torch.nn.Module | None = None,
               fused: bool = False, chunk_size: int = 0) -> LossParts:
    """CE + reg_weight * the method's per-token regularizer (mean; none: CE only) for one collated
    micro-batch (keys as `CacheCollator` returns them). A weight penalty is added by `CacheLossMixin`.

    The model is called WITHOUT labels so it does not compute (and allocate for) its own loss.
    `peft_model` is the unwrapped PeftModel used for the `live` teacher (defaults to `model`).
    `fused`: the same loss via `fused_batch_loss` (no [B, T, V] logits); `chunk_size` its rows per chunk.
    """
    if fused:
        return fused_batch_loss(model, inputs, method, reg_weight, num_items, peft_model, chunk_size)
    labels = inputs["labels"]
    if method.needs_live_teacher:  # teacher first, so its full [B, T, V] logits are freed before backward
        teacher_model = peft_model if peft_model is not None else model
        with teacher_model.disable_adapter(), torch.no_grad():
            teacher_full = teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        teacher_logits, _ = labelled_positions(teacher_full, labels)
        del teacher_full
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    student_logits, targets = labelled_positions(logits, labels)
    per_token, a_y = None, None  # none, l2, lalora: no per-token term (CacheLossMixin adds a penalty)
    if method.regularizer is not None:
        teacher = teacher_logits if method.needs_live_teacher else _teacher(method, inputs, targets)
        per_token = method.regularizer(student_logits, targets, teacher)
        a_y = _target_logprob(teacher, targets)
    return regularized_loss(student_logits, targets, per_token, reg_weight, num_items=num_items,
                            teacher_target_logprob=a_y, estimates=method.estimates)


def _target_logprob(teacher, targets: torch.Tensor) -> torch.Tensor | None:
    """The teacher's log-prob of each target (a_y [N]), for the logged decomposition: cached, or from the
    live teacher's logits [N, V]; None for a teacher of another kind (a registered method's own)."""
    if isinstance(teacher, CachedTeacher):
        return teacher.target_logprob
    if isinstance(teacher, torch.Tensor) and teacher.dim() == 2:
        with torch.no_grad():  # computed as the student's log q_y is (regularized_loss): equal logits give equal values
            return -F.cross_entropy(teacher.float(), targets, reduction="none")
    return None


def _teacher(method: Method, inputs: dict[str, torch.Tensor], targets: torch.Tensor) -> CachedTeacher | None:
    """The cached teacher arrays for a method that reads them, else None."""
    return _cached_teacher(inputs, targets) if method.reads_cache else None


def fused_batch_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], method: Method, reg_weight: float,
                     num_items: int | torch.Tensor | None = None, peft_model: torch.nn.Module | None = None,
                     chunk_size: int = 0) -> LossParts:
    """`batch_loss` from the last hidden state at the labelled positions and the lm_head weight, through
    `chunked_regularized_loss` (fused_loss.py): the [B, T, V] logits are never built. `chunk_size` 0 = auto."""
    check_fused(method)
    peft_model = peft_model if peft_model is not None else model
    hidden, autocast = final_hidden_state(model, peft_model, inputs["input_ids"], inputs["attention_mask"])
    hidden, targets = labelled_positions(hidden, inputs["labels"])
    weight, bias = output_head(peft_model)
    teacher = _teacher(method, inputs, targets) if method.regularizer is not None else None  # none, l2, lalora: CE
    # The lm_head's dtype inside the forward (accelerate's autocast may cover only the forward).
    context = torch.autocast(hidden.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with context:
        return chunked_regularized_loss(hidden, weight, targets, teacher, reg_weight, method.fused_estimator, num_items,
                                        chunk_size or auto_chunk_size(weight.shape[0]), bias)


# --- the mixin ---------------------------------------------------------------------------------
class CacheLossMixin:
    """Mix in before a `Trainer` class: its loss becomes `batch_loss` (+ the weight penalty), and it logs
    per-token CE, the regularizer and tokens/s per logging window. Keyword arguments: `method` (a
    `Method`, or a registered name looked up here once), `reg_weight`, `variant` (the LoRA variant,
    checked against the method), `penalty`, `fused_loss`, `fused_chunk_size` (0 = auto); the rest go
    to the Trainer."""

    loss_is_scaled_for_ga = True  # compute_loss normalizes by the whole step's labelled-token count

    def __init__(self, *args: Any, method: Method | str, reg_weight: float, variant: str = "lora",
                 penalty: WeightPenalty | None = None, fused_loss: bool = False, fused_chunk_size: int = 0,
                 **kwargs: Any) -> None:
        method = as_method(method)
        check_variant(method, variant)
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            raise ValueError("remove_unused_columns must be False with CacheLossMixin: the Trainer would drop the "
                             "cache columns (loss_mask, teacher arrays) that are not forward() arguments")
        self.method, self.reg_weight = method, reg_weight
        self.fused_loss, self.fused_chunk_size = fused_loss, fused_chunk_size  # see fused_batch_loss
        # l2/lalora: R(theta), set (anchored at init) by stages.student.runner before training; see weight_penalties
        self.penalty = penalty
        # Make the Trainer count labels[:, 1:] != -100 over the accumulated micro-batches whatever
        # the model class says: our labels always follow the causal-shift convention.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._window: torch.Tensor | None = None  # on device: CE sum, logged regularizer sum, labelled, input tokens
        self._window_start = time.time()
        self.session_tokens = 0

    def train(self, *args: Any, **kwargs: Any):
        self._window_start = time.time()  # tokens/s of the first window excludes setup time
        return super().train(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The micro-batch's share of the step loss, already scaled for accumulation (see module doc)."""
        parts = batch_loss(model, inputs, self.method, self.reg_weight, num_items_in_batch,
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
            parts = dataclasses.replace(parts, loss=loss, penalty=value.detach())
        logged = self._logged(parts)
        if model.training:  # stays on device: no host sync per micro-batch
            n = parts.ce.new_tensor(parts.n_tokens, dtype=torch.float64)
            decomposition = parts.decomposition.double() if parts.decomposition is not None else n.new_zeros(2)
            update = torch.cat([torch.stack([parts.ce.double() * n, logged.double() * n, n, inputs["attention_mask"].sum().double()]),
                                decomposition])
            self._window = update if self._window is None else self._window + update
        return (loss, {"ce": parts.ce, self.method.log_key: logged}) if return_outputs else loss

    def _logged(self, parts: LossParts) -> torch.Tensor:
        """The unweighted regularizer logged under `Method.log_key`: the weight penalty, else the per-token mean."""
        return parts.penalty if self.method.penalty is not None else parts.regularizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training-window log (the end-of-train summary says "train_loss")
            logs.update(self._drain_window())
        super().log(logs, start_time)

    def _drain_window(self) -> dict[str, float]:
        """Per-token CE, the regularizer (under `Method.log_key`), input tokens/s and, for a KL method, the binary
        term's share of the full KL (`binary_share`, loss.py `decomposition_sums`) since the last log; summed over
        processes."""
        window = self._window if self._window is not None else torch.zeros(6, dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            window = self.accelerator.reduce(window, reduction="sum")
        ce_sum, kl_sum, n, tokens, binary_sum, full_sum = window.tolist()
        now = time.time()
        elapsed, self._window_start = now - self._window_start, now
        self._window = None
        self.session_tokens += int(tokens)
        logs = {"ce": ce_sum / max(n, 1.0), self.method.log_key: kl_sum / max(n, 1.0), "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if full_sum > 0:
            logs["binary_share"] = binary_sum / full_sum
        return logs

