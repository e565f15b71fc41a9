"""What a config may pass to the HF Trainer beyond the project's own keys: `train.report_to` and
`train.trainer_args` (validated here; applied by stages/student/trainer.py `training_arguments`).

    train:
      report_to: tensorboard            # tensorboard (default) | wandb | mlflow | none, or a list
      trainer_args: {gradient_checkpointing: true, optim: adamw_torch_fused, max_grad_norm: 0.5}

`trainer_args` keys are checked against the installed `transformers.TrainingArguments` (an unknown
key is named, with the closest field). Keys the project sets are refused with a pointer: its own
`train.*` fields (OWNED_BY_TRAIN) and those its loss, collator, logs and resume depend on (REQUIRED).
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import importlib.util
import types
import typing
from typing import Any

__all__ = ["REPORTERS", "OWNED_BY_TRAIN", "REQUIRED", "REQUIRED_ACCELERATOR", "normalize_report_to",
           "check_reporters_installed", "check_trainer_args"]

# train.report_to values -> the package each needs (none: log.csv only)
REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "none": ""}

# TrainingArguments field -> the train.* key that sets it (stages/student/trainer.py training_arguments)
OWNED_BY_TRAIN = {
    "output_dir": "train.output_dir (checkpoints go to <output_dir>/checkpoints)",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "num_train_epochs": "train.epochs", "max_steps": "train.max_steps", "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler", "warmup_steps": "train.warmup_ratio", "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "seed": "train.seed", "bf16": "train.bf16", "save_steps": "train.save_steps",
    "logging_steps": "train.logging_steps", "report_to": "train.report_to",
}

# TrainingArguments fields the project fixes because something depends on them -> why
REQUIRED = {
    "remove_unused_columns": "must stay False: the collator's teacher arrays are not forward() arguments",
    "label_names": "the loss reads `labels` itself; the model is called without labels",
    "use_cpu": "set from the machine: without CUDA, accelerate runs DDP under torchrun only when told it runs on CPU",
    "average_tokens_across_devices": "the loss is divided by the step's labelled-token count summed over processes "
                                     "(stages/student/trainer.py module doc); per-process counts would change the gradient",
    "logging_dir": "TensorBoard writes into <train.output_dir>/tensorboard",
    "save_strategy": "must stay 'steps': resume and train.save_steps count optimizer steps",
    "logging_strategy": "must stay 'steps': log.csv and train.logging_steps count optimizer steps",
    "logging_first_step": "metrics.json's ce_start is the first step's logging window",
    "include_num_input_tokens_seen": "metrics.json's token count reads it",
}

# accelerator_config keys the project fixes (the rest of a given accelerator_config is passed on)
REQUIRED_ACCELERATOR = {
    "dispatch_batches": "must stay False: the teacher arrays are [N, k] over labelled positions, not batch-major, "
                        "so accelerate must never slice a collated batch along dim 0",
    "split_batches": "must stay False: the teacher arrays are [N, k] over labelled positions, not batch-major",
}


def normalize_report_to(value: Any) -> str | list[str]:
    """`train.report_to` as saved in config.yaml: one name, or a list of distinct names (none alone).
    ValueError on an unknown name or `none` next to another."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError(f"train.report_to: expected a name or a list of names from {list(REPORTERS)}, got {value!r}")
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"train.report_to: {unknown} not in {list(REPORTERS)}")
    names = list(dict.fromkeys(names))
    if "none" in names and len(names) > 1:
        raise ValueError(f"train.report_to: 'none' cannot be combined with {[n for n in names if n != 'none']}")
    return names[0] if len(names) == 1 else names


def check_reporters_installed(report_to: str | list[str]) -> list[str]:
    """The integrations for `TrainingArguments.report_to` ([] for none); ValueError naming the package
    that a requested one needs and is not installed (before any model is loaded)."""
    names = [n for n in ([report_to] if isinstance(report_to, str) else report_to) if n != "none"]
    missing = [REPORTERS[n] for n in names if importlib.util.find_spec(REPORTERS[n]) is None]
    if missing:
        raise ValueError(f"train.report_to: {names} asked for, but the package {missing[0]!r} is not installed "
                         f"(pip install {' '.join(missing)}), or set train.report_to: tensorboard | none")
    return names


def _trainer_fields() -> set[str]:
    from transformers import TrainingArguments  # only when trainer_args is given: config loading stays light

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def _refusal(key: str, value: Any) -> str | None:
    if key in OWNED_BY_TRAIN:
        return f"train.trainer_args.{key}: set by the project; use {OWNED_BY_TRAIN[key]}"
    if key in REQUIRED:
        return f"train.trainer_args.{key}: set by the project ({REQUIRED[key]})"
    if key == "accelerator_config":
        if not isinstance(value, dict):
            return f"train.trainer_args.accelerator_config: expected a mapping, got {value!r}"
        fixed = [k for k in value if k in REQUIRED_ACCELERATOR]
        if fixed:
            return f"train.trainer_args.accelerator_config.{fixed[0]}: set by the project ({REQUIRED_ACCELERATOR[fixed[0]]})"
    return None


def check_trainer_args(trainer_args: dict[str, Any]) -> None:
    """ValueError for the first key the project owns (with its pointer or reason), then for keys the
    installed TrainingArguments does not have (each named, with the closest field)."""
    if not isinstance(trainer_args, dict) or not all(isinstance(k, str) for k in trainer_args):
        raise ValueError(f"train.trainer_args: expected a mapping of TrainingArguments fields, got {trainer_args!r}")
    for key, value in trainer_args.items():
        if (why := _refusal(key, value)) is not None:
            raise ValueError(why)
    if not trainer_args:
        return
    fields = _trainer_fields()
    unknown = [k for k in trainer_args if k not in fields]
    if unknown:
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, fields, n=1)) else "")
                 for k in unknown]
        raise ValueError(f"train.trainer_args: not TrainingArguments fields in the installed transformers: {', '.join(hints)}")
    for key, value in trainer_args.items():
        if (why := _wrong_value(key, value)) is not None:
            raise ValueError(why)


def _accepts(hint: Any, value: Any) -> bool | None:
    """Whether `value` fits the annotation `hint` (None: a type this check does not judge)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return value in {m.value for m in hint} or value in set(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):  # `OptimizerNames | str`: the string must name a member
            return any(_accepts(e, value) for e in enums)
        verdicts = [_accepts(a, value) for a in args]
        return True if any(v is True for v in verdicts) else (None if any(v is None for v in verdicts) else False)
    if origin in (dict, list, tuple):
        return isinstance(value, origin)
    if hint in (dict, list, tuple):
        return isinstance(value, hint)
    return None


def _wrong_value(key: str, value: Any) -> str | None:
    """A message when `value` cannot be what the installed TrainingArguments declares for `key`, so a
    bad value fails when the config is read, not inside the Trainer at its first step."""
    from transformers import TrainingArguments

    hint = typing.get_type_hints(TrainingArguments).get(key)
    if hint is None or _accepts(hint, value) is not False:
        return None
    enums = [a for a in (hint, *typing.get_args(hint)) if isinstance(a, type) and issubclass(a, enum.Enum)]
    allowed = f"one of {[m.value for m in enums[0]]}" if enums else f"{getattr(hint, '__name__', None) or hint}"
    return f"train.trainer_args.{key}: expected {allowed}, got {value!r}"
