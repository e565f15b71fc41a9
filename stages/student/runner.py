"""Stage two: fine-tune a LoRA adapter with the cached teacher as the forgetting regularizer.

    python -m pipeline train --config configs/demo.yaml
    python -m pipeline train --config configs/demo.yaml --resume     (continue from the last checkpoint)

    get_method -> load_cache (open_cache -> load_cache_dataset -> CacheCollator) -> make_student -> CacheTrainer -> save

The runner is the one place that sees the whole config (`StageConfig`): it looks `train.method` up once
and hands each piece its own section (`TrainConfig`), the resolved `Method` and the model path.

Writes into `train.output_dir`: checkpoints/, log.csv, tensorboard/ (train.report_to: tensorboard),
adapter/ (stock peft LoRA format), config.yaml, cache_fingerprint.json, metrics.json.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import TrainerCallback, set_seed

from stages.common.saved_config import read_saved_config
from stages.common.stage_config import StageConfig, save_config, to_dict
from stages.common.tensorboard_log import reports_to_tensorboard, tensorboard_dir
from stages.data.identity import data_differences
from stages.student.adapters import make_student, render_adapted, save_initial_adapter
from stages.student.library import load_cache
from stages.student.methods import Method, build_penalty, check_variant, get_method
from stages.student.trainer import (
    CHECKPOINT_DIR,
    build_trainer,
    last_checkpoint,
    train_and_save,
    use_bf16,
)
from stages.student.variants import MUTATES_BASE
from storage_schemas import FingerprintMismatch, Manifest

__all__ = ["run_train", "resume_point", "check_finished"]

# Config keys that may change between a run and its resumption (they do not change what is learned
# up to the checkpoint); any other difference is refused.
_RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.save_steps", "train.logging_steps",
                      "data.path",  # where the data lives: its bytes are checked against the cache either way
                      "train.fused_loss", "train.fused_chunk_size",  # the same loss and gradients, fused or not
                      "train.report_to"}  # where the logs go
# train.trainer_args keys that may change on resume: memory/speed and bookkeeping switches that leave the
# loss, the gradients and the optimizer as they were (gradient checkpointing recomputes the same forward).
# Any other trainer_args change (optim, max_grad_norm, adam_*, ...) is refused like any other key.
_RESUMABLE_TRAINER_ARGS = ("gradient_checkpointing", "gradient_checkpointing_kwargs", "save_total_limit",
                           "dataloader_num_workers", "dataloader_pin_memory", "dataloader_prefetch_factor",
                           "dataloader_persistent_workers", "disable_tqdm", "torch_empty_cache_steps", "ddp_timeout")
_STAGE_SECTIONS = ("model", "data", "cache", "train")


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else {name: value})
    return out


def _saved_config(saved: Path) -> dict[str, Any]:
    """A run's saved config.yaml, flattened, over the defaults (a key the run predates had its
    default). Only the stages' sections are compared, so no YAML schema beyond them is needed."""
    raw = read_saved_config(saved)  # old key names translated (stages/common/saved_config.py)
    return {**_flat(to_dict(StageConfig())), **_flat({k: v for k, v in raw.items() if k in _STAGE_SECTIONS})}


def _resumable(key: str) -> bool:
    """Whether a flattened config key (train.trainer_args.gradient_checkpointing_kwargs.use_reentrant, ...)
    may differ between a run and its resumption."""
    return key in _RESUMABLE_CHANGES or key.startswith("eval.") or any(
        key == f"train.trainer_args.{name}" or key.startswith(f"train.trainer_args.{name}.") for name in _RESUMABLE_TRAINER_ARGS)


def _stage_keys(flat: dict[str, Any]) -> dict[str, Any]:
    """The flattened keys of the stages' sections (top-level records such as a Hub id's revision are not compared)."""
    return {k: v for k, v in flat.items() if k.split(".")[0] in _STAGE_SECTIONS}


def _shown(key: str, flat: dict[str, Any]) -> str:
    """A config value for a message; a trainer_args key left unset shows transformers' default."""
    if key in flat:
        return repr(flat[key])
    if key.startswith("train.trainer_args."):
        from transformers import TrainingArguments

        field = TrainingArguments.__dataclass_fields__.get(key.removeprefix("train.trainer_args.").split(".")[0])
        if field is not None and field.default is not dataclasses.MISSING:
            return f"unset (transformers default {field.default!r})"
    return "unset"


def _check_same_config(config: StageConfig, saved: Path) -> None:
    """Refuse to resume a run whose saved config differs in anything but _RESUMABLE_CHANGES."""
    if not saved.exists():
        return
    before, now = _stage_keys(_saved_config(saved)), _stage_keys(_flat(to_dict(config)))
    changed = sorted(k for k in before.keys() | now.keys()
                     if before.get(k) != now.get(k) and not _resumable(k))
    if changed:
        details = "; ".join(f"{k}: {_shown(k, before)} -> {_shown(k, now)}" for k in changed)
        raise ValueError(f"cannot resume {saved.parent}: the config changed since the checkpoint ({details})")


def resume_point(config: StageConfig, resume: bool) -> Path | None:
    """The checkpoint to resume from, None to start fresh; refuses to overwrite an existing run."""
    run_dir = Path(config.train.output_dir)
    checkpoint = last_checkpoint(run_dir)
    if not resume:
        if checkpoint is not None or (run_dir / "adapter").exists():
            raise ValueError(f"{run_dir} already holds a run (checkpoints or adapter): resume it "
                             "(--resume) or choose another train.output_dir")
        return None
    if checkpoint is None:
        print(f"no complete checkpoint in {run_dir / CHECKPOINT_DIR}: starting from scratch")
        return None
    _check_same_config(config, run_dir / "config.yaml")
    print(f"resuming from {checkpoint}")
    return checkpoint


def _initial_adapter(model, run_dir: Path, variant: str, resume_from: Path | None) -> Path | None:
    """PiSSA/OLoRA: save the adapter as initialized, needed to save a stock LoRA at the end.

    Kept from the first session on resume: the seeded init is deterministic, so it matches."""
    if variant not in MUTATES_BASE:
        return None
    path = run_dir / CHECKPOINT_DIR / "adapter_init"
    if resume_from is None or not path.exists():
        save_initial_adapter(model, path)
    return path


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _regularizer(metrics: dict[str, Any], method: Method) -> str:
    """`KL 0.01234` or `penalty 0.01234`; a finished run from before the registry logged both as final_kl."""
    key = method.log_key
    value = metrics.get(f"final_{key}", metrics.get("final_kl"))
    return f"{'KL' if key == 'kl' else key} {_num(value, '.5f')}"


def _fused(metrics: dict[str, Any]) -> str:
    if "fused_loss" not in metrics:  # a run finished before the fused loss was recorded
        return "n/a"
    return "on (no [B, T, V] logits)" if metrics["fused_loss"] else f"off ({metrics.get('fused_loss_reason') or 'not asked'})"


def _summary(metrics: dict[str, Any], config: StageConfig, method: Method) -> str:
    train = config.train
    return "\n".join([
        f"stage two done: method={train.method} reg_weight={train.reg_weight} "
        f"lora={train.lora.variant} r={train.lora.rank}"
        + (f" base={train.quantization} (QLoRA)" if train.quantization != "none" else ""),
        f"  steps {metrics['steps']}, tokens {metrics['tokens']:,} "
        f"({metrics['tokens_per_s']:,.0f} tok/s over {metrics['wall_time_s']:.1f} s this session)",
        f"  CE {_num(metrics['ce_start'], '.4f')} (step 1) -> {_num(metrics['final_ce'], '.4f')} (last window), "
        f"{_regularizer(metrics, method)} (last window), peak RSS {metrics['peak_rss_mib']:,.0f} MiB",
        f"  adapter: {metrics['adapter_dir']}  (stages.student.adapters.load_adapter(base_model, that_dir); "
        "stock PeftModel.from_pretrained for every variant but sinelora)",
        f"  adapted modules: {render_adapted(metrics['adapted_modules']) if 'adapted_modules' in metrics else 'n/a'}",
        f"  fused loss: {_fused(metrics)}",
        f"  metrics: {Path(train.output_dir) / 'metrics.json'}",
        f"  logs: {Path(train.output_dir) / 'log.csv'}" + (
            f", tensorboard --logdir {tensorboard_dir(train.output_dir)}" if reports_to_tensorboard(train.report_to) else ""),
    ])


def finished_run_metrics(config: StageConfig) -> dict | None:
    """metrics.json of a run in train.output_dir that already reached its step budget, else None.

    Resuming such a run would otherwise let the Trainer take one step past the budget."""
    run_dir = Path(config.train.output_dir)
    path = run_dir / "metrics.json"
    if not (path.exists() and (run_dir / "adapter").exists()):
        return None
    metrics = json.loads(path.read_text())
    budget = config.train.max_steps
    return metrics if budget <= 0 or metrics.get("steps", 0) >= budget else None


def _supersede_eval(run_dir: Path) -> None:
    """An eval.json beside an adapter that is about to change (a run extended with --resume) would
    describe the old adapter: it is renamed eval.superseded.json, and said."""
    if (run_dir / "eval.json").exists():
        (run_dir / "eval.json").replace(run_dir / "eval.superseded.json")
        print(f"{run_dir}/eval.json described the adapter before this training: renamed eval.superseded.json "
              "(run `eval --run` again when training ends)")


def _check_cache_data(config: StageConfig, manifest: Manifest) -> None:
    """FingerprintMismatch naming each data.* setting under which stage one would not have written
    the cache (stages/data/identity.py): training would record one dataset and train on another."""
    problems = data_differences(config.data, manifest.dataset, manifest.settings.max_length)
    if problems:
        raise FingerprintMismatch(f"{config.cache.dir}: the cache does not hold the data this config names:\n  "
                                  + "\n  ".join(problems) + "\nRe-run stage one for this data (python -m pipeline cache-teacher "
                                  "with this config and a cache.dir of its own), or set data.* back to the cache's values")


def _cache_data_header(manifest: Manifest) -> str:
    d = manifest.dataset
    return (f"The data this run trained on is the cache's (manifest.json dataset), not re-read from data.path:\n"
            f"  source {d.source} (split {d.split}), files sha256 {d.source_sha256}\n"
            f"  format {d.format}, column(s) {d.field}, input rules {d.input_rules}, {d.num_examples} examples, "
            f"max_length {manifest.settings.max_length}")


def _curvature_line(report: dict) -> str:
    """lalora: `kfac curvature of 64 texts (3,210 positions): computed in 4.1 s, 1.2 MiB -> <file>` (or reused)."""
    how = (f"reused (computed in {report['seconds']:.1f} s by an earlier run)" if report["reused"]
           else f"computed in {report['seconds']:.1f} s")
    return (f"lalora: {report['curvature']} curvature of {report['sequences']} texts ({report['positions']:,} positions): "
            f"{how}, {report['bytes'] / 2**20:.2f} MiB -> {report['path']}")


def check_finished(config: StageConfig, run_dir: str | Path) -> dict:
    """metrics.json of the finished run in `run_dir` (its saved config: `config`; {} without one), or ValueError saying
    what is unfinished: an adapter/ left by an earlier finish while a longer run (train --resume) has
    not reached its train.max_steps describes a model the run's config.yaml does not."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").exists():  # an adapter/ put there by hand: nothing says how it was trained
        return {}
    done = finished_run_metrics(dataclasses.replace(config, train=dataclasses.replace(config.train, output_dir=str(run_dir))))
    if done is None:
        steps = json.loads((run_dir / "metrics.json").read_text()).get("steps", 0)
        raise ValueError(f"{run_dir}: training has not finished ({steps} of train.max_steps={config.train.max_steps} steps in "
                         "metrics.json; its adapter/ is from an earlier finish, if any); finish it with "
                         "`python -m pipeline train --resume` and the same settings")
    return done


def run_train(config: StageConfig, resume: bool = False, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Train one adapter on the cache in `config.cache.dir`; returns the metrics written to metrics.json."""
    train, run_dir = config.train, Path(config.train.output_dir)
    method = get_method(train.method)  # the run's one lookup: everything below gets the Method itself
    check_variant(method, train.lora.variant)  # before any expensive step
    if resume and (done := finished_run_metrics(config)) is not None:
        _check_same_config(config, run_dir / "config.yaml")
        print(f"{run_dir} already finished; nothing to train.\n" + _summary(done, config, method))
        return done
    resume_from = resume_point(config, resume)
    _supersede_eval(run_dir)
    # s3://... is mirrored to cache.local_dir; fingerprint checks, the method's columns, the collator
    cached = load_cache(config.cache.dir, config.model, method, k=train.k, streaming=train.streaming,
                        allow_model_mismatch=train.allow_model_mismatch, local_dir=config.cache.local_dir)
    manifest, dataset, collator = cached.manifest, cached.dataset, cached.collator
    _check_cache_data(config, manifest)
    if train.streaming:
        dataset = dataset.shuffle(seed=train.seed, buffer_size=1024)
    set_seed(train.seed)  # before make_student: PiSSA's randomized SVD must be reproducible
    model = make_student(config.model, train.lora, torch.bfloat16 if use_bf16(train.bf16) else torch.float32, train.quantization)
    trainer = build_trainer(model, dataset, collator, train, method, manifest.num_rows, callbacks)
    # l2/lalora: anchor (and lalora's Fisher) at the init, on the device the Trainer placed the model;
    # a resume rebuilds the same seeded init, so the anchor matches before the checkpoint is loaded
    trainer.penalty = build_penalty(train, method, trainer.model, config.model)
    if getattr(trainer.penalty, "report", None) and trainer.is_world_process_zero():
        print(_curvature_line(trainer.penalty.report))
    initial = _initial_adapter(model, run_dir, train.lora.variant, resume_from) if trainer.is_world_process_zero() else None
    if trainer.is_world_process_zero():
        # the run's one config.yaml, from the start: a resume is checked against it
        save_config(config, run_dir / "config.yaml", header=_cache_data_header(manifest))
    metrics = train_and_save(trainer, train, manifest, resume_from, initial)
    if trainer.is_world_process_zero():
        print(_summary(metrics, config, method))
    return metrics
