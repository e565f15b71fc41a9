"""The training methods: one registry, name -> what a method reads, needs, allows, scales and logs.

    python -m pipeline train --config configs/demo.yaml train.method=full_kl train.reg_weight=0.5

    from stages.student.methods import get_method
    get_method("tail").reads_cache        # True: the collator decodes the cached teacher columns

Config validation (stages/student/settings.py), the sweep's grid and the approximation study
(pipeline/studies/) ask this registry; none of them lists method names. A run looks its method up
once (stages/student/runner.py `run_train`) and passes the `Method` itself down to the reader's columns, the
trainer and the loss of each micro-batch (stages/student/trainer.py, loss_mixin.py). A new method is one
`register_method(Method(...))` with its loss function (tests/stages/student/test_methods.py registers
a reverse KL that way, and trains and sweeps it).

    method   teacher  train.reg_weight scales                    logged as  notes
    tail     cache    per-token masked KL, tail bucket (default)  kl         a lower bound; exact at k = |V|-1
    topk     cache    per-token KL renormalized over the k ids    kl         biased; for comparison
    full_kl  cache    per-token unmasked KL(p || q)               kl
    sampled_tail cache per-token masked KL, S exact + tail drawn  kl         unbiased; needs a cache with tail draws
    live     live     per-token exact masked KL                   kl         not with pissa/olora; no fused loss
    none     -        nothing (plain LoRA)                        kl (= 0)
    l2       -        1/2 sum (theta - theta0)^2, once per step   penalty
    lalora   -        1/2 sum F (theta - theta0)^2, once per step penalty    needs train.fisher_data

The loss is CE + reg_weight * (mean per-token regularizer) or CE + reg_weight * penalty; the logged
`kl` / `penalty` (log.csv, metrics.json `final_kl` / `final_penalty`) is the unweighted regularizer.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from stages.student.variants import MUTATES_BASE

# No torch at import: the settings (config loading) import this registry. The loss functions and the
# weight penalties are imported by the small wrappers below, when a run first calls them.
if TYPE_CHECKING:
    import torch

    from stages.student.weight_penalties import WeightPenalty

__all__ = ["Method", "register_method", "registered", "get_method", "as_method", "method_names", "methods",
           "check_variant", "check_fused", "build_penalty", "TEACHERS"]

TEACHERS = ("cache", "live", "none")

# (student_logits [N, V], targets [N], teacher) -> [N] float32; teacher: a CachedTeacher ("cache"),
# the base model's logits [N, V] at the same positions ("live"), or None ("none")
Regularizer = Callable[["torch.Tensor", "torch.Tensor", Any], "torch.Tensor"]
# (train settings, the student, its base model dir) -> R(theta), anchored at the current weights
PenaltyBuilder = Callable[[Any, "torch.nn.Module", str], "WeightPenalty"]


@dataclass(frozen=True)
class Method:
    """One training method: a per-token `regularizer`, a per-step weight `penalty`, or neither.

    teacher           "cache": reads the cached teacher columns; "live": the step runs the base model
                      (the adapter disabled) for the teacher logits; "none": no teacher
    regularizer       per-token regularizer (`Regularizer` above): loss = CE + reg_weight * its mean
    penalty           builds the weight penalty (`PenaltyBuilder`): loss = CE + reg_weight * R, once per step
    fused_estimator   the stages.student.loss estimator the fused chunked loss computes for `regularizer`;
                      None: no fused form (train.fused_loss is refused when there is a regularizer)
    refused_variants  LoRA variants it cannot train with; `refusal` says why
    requires          train.* settings that must be set (non-empty) for it
    estimates         what the regularizer equals at k = |V|-1: "masked_kl" (D), "full_kl" (unmasked
                      KL), or "" (anything else); the approximation study measures the first two
    needs_draws       reads the cache's tail draws: needs a cache of an encoding with tail_draws (and all its k)
    """

    name: str
    teacher: str = "none"
    regularizer: Regularizer | None = None
    penalty: PenaltyBuilder | None = None
    fused_estimator: str | None = None
    refused_variants: frozenset[str] = frozenset()
    refusal: str = ""
    requires: tuple[str, ...] = ()
    estimates: str = ""
    needs_draws: bool = False

    def __post_init__(self) -> None:
        if self.teacher not in TEACHERS:
            raise ValueError(f"method {self.name!r}: teacher {self.teacher!r} not in {TEACHERS}")
        if self.regularizer is not None and self.penalty is not None:
            raise ValueError(f"method {self.name!r}: a regularizer or a penalty, not both (one weight scales it)")
        if self.teacher != "none" and self.regularizer is None:
            raise ValueError(f"method {self.name!r}: teacher {self.teacher!r} without a regularizer to use it")

    @property
    def reads_cache(self) -> bool:
        """Whether the reader loads and the collator decodes the cached teacher columns (and train.k applies)."""
        return self.teacher == "cache"

    @property
    def needs_live_teacher(self) -> bool:
        return self.teacher == "live"

    @property
    def weight_scales(self) -> str:
        """What train.reg_weight multiplies: "per_token" (a regularizer), "penalty" or "nothing"."""
        return "per_token" if self.regularizer is not None else "penalty" if self.penalty is not None else "nothing"

    @property
    def log_key(self) -> str:
        """The log.csv column / metrics.json `final_<key>` of the unweighted regularizer."""
        return "penalty" if self.penalty is not None else "kl"

    @property
    def supports_fused(self) -> bool:
        """Whether the chunked fused loss can compute it: CE alone, or a regularizer with a fused estimator.
        The one definition; `check_fused` and stages/student/trainer.py `resolve_fused_loss` ask it."""
        return self.regularizer is None or self.fused_estimator is not None

    def allows(self, variant: str) -> bool:
        return variant not in self.refused_variants


# --- the registry -------------------------------------------------------------------------------
_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Add `method` under its name (a name is registered once)."""
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


@contextlib.contextmanager
def registered(method: Method) -> Iterator[Method]:
    """`method` registered for the duration of a with block (tests, one-off experiments)."""
    register_method(method)
    try:
        yield method
    finally:
        _METHODS.pop(method.name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def methods() -> tuple[Method, ...]:
    return tuple(_METHODS.values())


def get_method(name: str, key: str = "train.method") -> Method:
    """The method called `name`; a ValueError naming `key` and the registered names otherwise."""
    method = _METHODS.get(name)
    if method is None:
        raise ValueError(f"{key}: {name!r} not in {method_names()}")
    return method


def as_method(method: Method | str) -> Method:
    """A `Method` as itself, a name looked up (the library's entry points accept either, once)."""
    return method if isinstance(method, Method) else get_method(method)


def check_variant(method: Method, variant: str) -> None:
    """Refuse a LoRA variant the method cannot train with (e.g. `live` with pissa/olora)."""
    if not method.allows(variant):
        raise ValueError(f"method {method.name!r} cannot be used with lora variant {variant!r}: {method.refusal}")


def check_fused(method: Method) -> None:
    """Refuse train.fused_loss=true for a method without a fused form (e.g. `live`)."""
    if not method.supports_fused:
        raise ValueError(f"train.fused_loss: not supported with method {method.name!r} (the chunked loss computes CE "
                         "and a cached estimator from the last hidden state; this method's regularizer needs the full logits)")


def build_penalty(train: Any, method: Method, model: torch.nn.Module, model_dir: str) -> WeightPenalty | None:
    """The weight penalty of `method` for `train` (a TrainConfig), anchored at the model's current weights;
    None for a method without one. Build it before any optimizer step."""
    return method.penalty(train, model, model_dir) if method.penalty is not None else None


# --- the methods --------------------------------------------------------------------------------
# Each imports its torch code on first call (module top: see the imports).
def _live_masked_kl(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    from stages.student.loss import live_masked_kl

    return live_masked_kl(student_logits, teacher_logits, targets)


def _cached_kl(student_logits: torch.Tensor, targets: torch.Tensor, teacher: Any, estimator: str) -> torch.Tensor:
    from stages.student.loss import cached_kl

    return cached_kl(student_logits, targets, teacher, estimator=estimator)


def _cached(estimator: str, estimates: str, needs_draws: bool = False) -> Method:
    return Method(estimator, teacher="cache", regularizer=functools.partial(_cached_kl, estimator=estimator),
                  fused_estimator=estimator, estimates=estimates, needs_draws=needs_draws)


def _l2_penalty(train: Any, model: torch.nn.Module, model_dir: str) -> WeightPenalty:
    from stages.student.weight_penalties import l2_penalty

    return l2_penalty(train, model, model_dir)


def _lalora_penalty(train: Any, model: torch.nn.Module, model_dir: str) -> WeightPenalty:
    from stages.student.weight_penalties import lalora_penalty

    return lalora_penalty(train, model, model_dir)


_LIVE_REFUSAL = ("pissa and olora move the principal part of every adapted weight into the adapter, so "
                 "disable_adapter() runs the residual W - BA, not the base model. Use a cached method "
                 "(tail, topk, full_kl): the cache holds the true base model's log-probs.")

for _method in (
    _cached("tail", "masked_kl"),
    _cached("topk", "masked_kl"),
    _cached("full_kl", "full_kl"),
    _cached("sampled_tail", "masked_kl", needs_draws=True),
    Method("none"),
    Method("live", teacher="live", regularizer=_live_masked_kl, refused_variants=MUTATES_BASE,
           refusal=_LIVE_REFUSAL, estimates="masked_kl"),
    Method("l2", penalty=_l2_penalty),
    Method("lalora", penalty=_lalora_penalty, requires=("fisher_data",)),
):
    register_method(_method)
