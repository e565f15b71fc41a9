"""TRL's `SFTTrainer` on the cached examples, with the project's CE + reg_weight * regularizer as its loss.

    from peft import LoraConfig
    from stages.student.library import load_cache
    from stages.student.trl_trainer import CacheSFTTrainer, cache_sft_config

    data = load_cache("runs/demo/cache", "build/default/base-model", method="tail")
    trainer = CacheSFTTrainer(model="build/default/base-model", args=cache_sft_config("runs/sft", max_steps=100),
                              cache=data, reg_weight=1.0, peft_config=LoraConfig(r=8, target_modules="all-linear"))
    trainer.train()

Needs `trl` (the `test` extra pins the version this was written against); nothing in the core imports
this module. `CacheSFTTrainer(CacheLossMixin, SFTTrainer)` uses TRL's public extension point (a subclass
overriding `compute_loss`, as TRL's own deprecation of `compute_loss_func` recommends); TRL still loads the
model from a path, applies `peft_config`, sets up the optimizer, logging and checkpointing.

What TRL would do to the cached rows by default, and what happens instead:
- dataset preparation: skipped (`dataset_kwargs={"skip_prepare_dataset": True}`, required). On rows that
  already hold `input_ids` (TRL 1.16) it would add a full-sequence `labels` column (unused: the collator
  builds labels from the cache's loss mask), cut `input_ids` to `max_length` but not the loss mask and
  teacher arrays (misaligned: the collator then refuses or trains on the wrong positions), drop rows and
  rewrite the dataset. `max_length` is then unused; one shorter than the cache's sequences (stage one's
  data.max_length) is refused, since it would not truncate (`cache_sft_config` sets None). `packing`,
  `padding_free`, `completion_only_loss=True` and `assistant_only_loss=True` are refused: the trained
  positions are the cache's loss mask, fixed at stage one.
- column removal: `remove_unused_columns=False` is required (loss_mask and the teacher arrays are not
  `forward()` arguments).
- its collator: replaced by the cache's `CacheCollator`; its NLL loss (`loss_type`, label smoothing,
  `compute_loss_func`): refused, the loss is `CacheLossMixin`'s.
- bf16 (TRL's default: on) and gradient checkpointing (TRL's default: on): `cache_sft_config` sets them
  as the CLI does by default: bf16 only on a CUDA device that supports it, checkpointing off. Either may be
  set explicitly.
- the model: when `model` is a path, TRL loads it (float32 unless `model_init_kwargs` say otherwise);
  before that the cache's fingerprint checks run against that path (a model object: the directory in its
  `config._name_or_path`), as stage two's `open_cache` does for the CLI.

TRL's own metrics (`entropy`, `mean_token_accuracy`, `num_tokens`) come from its fused LM head, which the
project's loss does not call. They are computed here with TRL's definitions, from what the loss's forward
already produced: the logits at the labelled positions (unfused), or, with `fused_loss=True` where there
are no logits, the last hidden state projected through the lm_head again in row chunks without gradient
(one extra [N, H] x [H, V] matmul per micro-batch, never [B, T, V] at once). They go into TRL's metric
store, so TRL's `log` averages them per logging window as it does its own.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from trl import SFTConfig, SFTTrainer

from stages.student.collator import IGNORE_INDEX
from stages.student.fused_loss import auto_chunk_size
from stages.student.library import CachedExamples
from stages.student.lm_head import output_head
from stages.student.loss_mixin import CacheLossMixin
from stages.student.reader import check_teacher, check_tokenizer
from stages.student.trainer import use_bf16

__all__ = ["CacheSFTTrainer", "cache_sft_config", "sft_config_problems", "token_metrics"]


# --- the config ----------------------------------------------------------------------------------
def cache_sft_config(output_dir: str | os.PathLike, **kwargs: Any) -> SFTConfig:
    """An `SFTConfig` that `CacheSFTTrainer` accepts: the required settings (module docstring), bf16 and
    the model dtype as the CLI's `train.bf16: auto`, no gradient checkpointing; `kwargs` override any of it
    (a required setting overridden is refused by the trainer)."""
    bf16 = kwargs.get("bf16", use_bf16("auto"))
    settings = dict(
        output_dir=str(output_dir), bf16=bf16, gradient_checkpointing=False,
        model_init_kwargs={"dtype": "bfloat16" if bf16 else "float32"},
        dataset_kwargs={"skip_prepare_dataset": True}, remove_unused_columns=False, max_length=None,
        # the teacher arrays are [N, k], not batch-major: accelerate must never slice a batch on dim 0
        accelerator_config={"dispatch_batches": False, "split_batches": False},
    )
    return SFTConfig(**{**settings, **kwargs})


def sft_config_problems(args: SFTConfig) -> list[str]:
    """What in `args` would misalign or drop the cache columns, or replace the project's loss."""
    problems = []
    if args.remove_unused_columns:
        problems.append("remove_unused_columns must be False (loss_mask and the teacher arrays are not forward() arguments)")
    if not (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        problems.append('dataset_kwargs must hold {"skip_prepare_dataset": True}: TRL would re-tokenize, add EOS, '
                        "rebuild labels and truncate the cached rows, misaligning the teacher arrays")
    for flag in ("packing", "padding_free", "completion_only_loss", "assistant_only_loss"):
        if getattr(args, flag):
            problems.append(f"{flag} must be off: the rows are the cache's, trained where its loss mask says")
    if args.loss_type != "nll" or args.label_smoothing_factor:
        problems.append("loss_type / label_smoothing_factor: the loss is CacheLossMixin's CE + reg_weight * regularizer")
    config = args.accelerator_config
    if getattr(config, "dispatch_batches", None) or getattr(config, "split_batches", False):
        problems.append("accelerator_config: dispatch_batches and split_batches must be False (the teacher arrays "
                        "are [N, k], not batch-major)")
    return problems


def _model_dir(model: Any) -> str:
    """The local directory the model (a path, or a loaded model) comes from, for the fingerprint checks."""
    path = model if isinstance(model, (str, os.PathLike)) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path or not Path(path).is_dir():
        raise ValueError(f"CacheSFTTrainer: cannot check the cache against the model: {str(path)!r} is not a local "
                         "model directory (pass the path, or a model loaded from one)")
    return str(path)


# --- TRL's metrics -------------------------------------------------------------------------------
@contextmanager
def _forward_outputs(peft_model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keeps (detached) what the next forwards of the model produce: the decoder's last hidden state
    [B, T, H] and the logits [B, T', V] (T' = 0 on the fused path); the last forward wins (for `live`,
    the student's, run after its teacher's)."""
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    seen: dict[str, torch.Tensor] = {}

    def keep_hidden(_module, _args, output):
        seen["hidden"] = (output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]).detach()

    def keep_logits(_module, _args, output):
        seen["logits"] = output.logits.detach()

    handles = [base.get_decoder().register_forward_hook(keep_hidden), base.register_forward_hook(keep_logits)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def token_metrics(seen: dict[str, torch.Tensor], labels: torch.Tensor, peft_model: torch.nn.Module) -> torch.Tensor:
    """[entropy sum, top-1 correct count, labelled count] over the labelled positions (float64), TRL's
    definitions at temperature 1: entropy of softmax(z), and whether the label is z's argmax.

    z: the kept logits when the forward built them for every position, else the kept hidden state
    [N, H] times the lm_head weight (`output_head`), in row chunks of `auto_chunk_size(V)`."""
    mask = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][mask]
    logits = seen.get("logits")
    if logits is not None and logits.shape[1] == labels.shape[1]:
        rows, weight, bias = logits[:, :-1][mask], None, None
    else:
        rows = seen["hidden"][:, :-1][mask]
        weight, bias = output_head(peft_model)
    out = torch.zeros(3, dtype=torch.float64, device=labels.device)
    chunk = auto_chunk_size(weight.shape[0] if weight is not None else rows.shape[-1])
    for start in range(0, rows.shape[0], chunk):
        z = rows[start:start + chunk]
        if weight is not None:
            z = F.linear(z, weight.to(z.dtype), None if bias is None else bias.to(z.dtype))
        logp = torch.log_softmax(z.float(), dim=-1)
        out[0] += -(logp.exp() * logp).sum(-1).double().sum()
        out[1] += (z.argmax(-1) == targets[start:start + chunk]).sum()
    out[2] = targets.numel()
    return out


# --- the trainer ---------------------------------------------------------------------------------
class CacheSFTTrainer(CacheLossMixin, SFTTrainer):
    """`SFTTrainer` training on `cache` (a `load_cache` result) with `CacheLossMixin`'s loss.

    `model`: a local model directory (TRL loads it; `peft_config` adds the adapter) or a model loaded from
    one. `args`: an SFTConfig `sft_config_problems` finds nothing in (`cache_sft_config` builds one).
    The method is the one `cache` was loaded for. `reg_weight`, `variant`, `fused_loss`,
    `fused_chunk_size`, `penalty` as `CacheLossMixin`; other keyword arguments go to `SFTTrainer`
    (`train_dataset` and `data_collator` default to the cache's). Raises ValueError for a config
    that would misalign the cache, FingerprintMismatch for a model the cache was not made for.
    """

    def __init__(self, model: Any, args: SFTConfig, cache: CachedExamples, *, reg_weight: float, **kwargs: Any) -> None:
        problems = sft_config_problems(args)
        if args.max_length is not None and args.max_length < cache.manifest.settings.max_length:
            problems.append(f"max_length={args.max_length}: the cached rows are up to {cache.manifest.settings.max_length} "
                            "tokens (stage one's data.max_length) and are not truncated again; set None")
        if kwargs.get("compute_loss_func") is not None:
            problems.append("compute_loss_func: the loss is CacheLossMixin's CE + reg_weight * regularizer")
        if problems:
            raise ValueError("CacheSFTTrainer: the config cannot train on the cache (cache_sft_config builds one that "
                             "can):\n  " + "\n  ".join(problems))
        model_dir = _model_dir(model)  # before TRL loads it: a wrong model fails in milliseconds
        check_tokenizer(cache.manifest, model_dir)
        check_teacher(cache.manifest, model_dir, cache.allow_model_mismatch)
        kwargs.setdefault("train_dataset", cache.dataset)
        kwargs.setdefault("data_collator", cache.collator)
        super().__init__(model=model, args=args, method=cache.method, reg_weight=reg_weight, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`CacheLossMixin.compute_loss`, plus TRL's metrics from the same forward (module docstring)."""
        peft_model = self.accelerator.unwrap_model(model)
        with _forward_outputs(peft_model) as seen:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._record_trl_metrics(token_metrics(seen, inputs["labels"], peft_model), inputs["attention_mask"])
        return result

    def _record_trl_metrics(self, sums: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Into TRL's metric store, gathered over processes as SFTTrainer.compute_loss does."""
        mode = "train" if self.model.training else "eval"
        entropy, correct, valid = self.accelerator.gather_for_metrics(sums[None]).sum(0).tolist()
        self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(attention_mask.sum()[None]).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
