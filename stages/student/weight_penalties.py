"""Weight-space forgetting baselines: penalties on the LoRA parameters, no teacher, no KL.

    train.method = l2       loss = CE + reg_weight * 1/2 * sum_i (theta_i - theta0_i)^2
    train.method = lalora   loss = CE + reg_weight * 1/2 * (vec(D)^T F vec(D) + level * |D|^2),  D = theta - theta0
                            (train.lalora_curvature = diag: 1/2 sum_i (F_i + level) D_i^2)

(registered in stages/student/methods.py with `l2_penalty` / `lalora_penalty` as their builders)

`theta` runs over every trainable parameter of the student (the LoRA A and B matrices, and DoRA's
magnitude vectors), `theta0` is their value at initialization (snapshot when the penalty is built,
before any optimizer step; on resume the seeded init is rebuilt identically, so the anchor matches).

`l2` penalizes the distance of the adapter parameters from their init, not the norm of the update
delta W = B A (the other common choice). For standard LoRA B0 = 0 but A0 is random, so "distance
from init" is the form that is zero at init; its gradient is reg_weight * (theta - theta0).

`lalora` follows "Mitigating Forgetting in Low Rank Adaptation" (LaLoRA, arXiv 2512.17720): a
Laplace approximation of the posterior after the source task, i.e. a diagonal-Fisher-weighted
quadratic around the init. F is the empirical Fisher of the source CE, estimated on
`train.fisher_examples` texts of `train.fisher_data` (SOURCE / retention text, "text" column):
F_i = mean over examples e of (d CE_e / d theta_i)^2, CE_e the mean token CE of example e (batch size
one, one backward per example), at theta0, model in eval mode (no dropout).

`train.lalora_curvature` kfac / tri_kfac replace the diagonal by K-FAC blocks of the same Fisher
(stages/student/curvature.py; `CurvaturePenalty`), and the curvature is kept on disk
(stages/student/curvature_store.py) so runs that differ only in lambda compute it once.

The B = 0 problem, and the fix chosen here: at standard LoRA init B = 0, so dCE/dA = B^T(...) = 0 and
F_A = 0 exactly: without a fix the A matrices would be free, and only B anchored. We compute the
Fisher at the init (the point the penalty is centred on; no perturbation, so it stays deterministic
and faithful to the Laplace approximation for B) and add a FLOOR:
    F_i <- F_i + fisher_floor * mean_j(F_j)     (mean over all trainable entries, one global scalar)
so A is anchored by an isotropic L2 term whose scale follows the measured curvature
(`train.fisher_floor`, default 0.1; 0 disables the floor and leaves A unpenalized). Variants whose B
is not zero at init (pissa, olora) get a non-zero F_A anyway; the floor applies to them too.
The raw Fisher is tiny (squared per-example gradients), so useful `reg_weight` values for lalora are
much larger than for the KL methods (sweep, e.g. 1e2 .. 1e5).

Logging and accumulation (stages/student/trainer.py, `CacheTrainer.compute_loss`): the penalty is
per optimizer step. Each micro-batch adds reg_weight * R / (micro-batches in this step), so the
accumulated gradient is exactly one penalty per step, added after the DDP rescaling (DDP averages
identical penalty gradients, leaving one). The logged `penalty` column (and metrics' `final_penalty`)
carries the unweighted penalty R (the 1/2-sum above); runs before the method registry logged it as `kl`.
"""
from __future__ import annotations

import torch

from stages.data.inputs import DataConfig, load_rows, tokenize_rows
from stages.student.curvature import Curvature, estimate_curvature

__all__ = ["WeightPenalty", "CurvaturePenalty", "penalty_from_curvature", "empirical_fisher", "fisher_examples", "l2_penalty",
           "lalora_penalty"]


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _finite(value: torch.Tensor) -> torch.Tensor:
    """`value`, or ValueError when it is nan/inf: training would go on and save a NaN adapter."""
    if not bool(torch.isfinite(value.detach())):
        raise ValueError(f"weight penalty: {float(value.detach())} (non-finite): the adapter weights or the curvature hold "
                         "nan/inf; a lower learning rate or reg_weight may help")
    return value


class WeightPenalty:
    """R(theta) = 1/2 * sum_i w_i (theta_i - theta0_i)^2 over the model's trainable parameters.

    `weights` None = all ones (l2); else {name: tensor like the parameter} (lalora's floored Fisher).
    The anchor is a detached copy of the parameters when the object is built. Call it to get R as a
    0-dim float32 tensor with gradient to the live parameters.
    """

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor] | None = None) -> None:
        self.params = _trainable(model)
        if not self.params:
            raise ValueError("weight penalty: the model has no trainable parameters")
        self.anchor = {n: p.detach().clone() for n, p in self.params}
        self.weights = None if weights is None else {n: weights[n].to(p.device, torch.float32) for n, p in self.params}

    def __call__(self) -> torch.Tensor:
        total = None
        for n, p in self.params:
            diff = p.float() - self.anchor[n].float()
            term = (diff * diff if self.weights is None else self.weights[n] * diff * diff).sum()
            total = term if total is None else total + term
        return _finite(0.5 * total)


def fisher_examples(path: str, model_dir: str, examples: int, max_length: int):
    """The first `examples` texts of `path`, tokenized with the student's tokenizer (stages.data.inputs).

    A "text" column is read whole; a chat ("messages") or prompt-completion file counts only what training
    would train (the assistant replies, the completion). ValueError naming train.fisher_data otherwise."""
    from transformers import AutoTokenizer

    cfg = DataConfig(path=path, max_length=max_length, max_examples=examples)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        rows = load_rows(cfg, check_field=False)
        columns = set(rows.column_names)
        if not ({cfg.text_field, cfg.messages_field} & columns or {cfg.prompt_field, cfg.completion_field} <= columns):
            raise ValueError(f"{path}: no \"{cfg.text_field}\" column (nor chat \"{cfg.messages_field}\", nor "
                             f"\"{cfg.prompt_field}\"/\"{cfg.completion_field}\"); its columns: {sorted(columns)}. Rename the "
                             f"column holding the source text to \"{cfg.text_field}\"")
        return tokenize_rows(rows, tokenizer, cfg)
    except (OSError, ValueError) as err:  # stages.data.inputs names "data.path": say which key it was
        raise ValueError(f"train.fisher_data: {err}") from err


def empirical_fisher(model: torch.nn.Module, examples, floor: float = 0.1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the mean-token CE w.r.t. the trainable parameters, floored.

    `examples`: `stages.data.inputs.Example`s (input_ids [T], loss_mask [T-1]). One forward/backward per
    example at the current parameters, eval mode; the model's .grad fields are left as they were.
    Returns {name: F_i + floor * mean(F)} in float32 (see the module doc for why the floor).
    """
    fisher = estimate_curvature(model, examples, "diag").diagonal
    total = sum(f.sum() for f in fisher.values())
    entries = sum(f.numel() for f in fisher.values())
    level = floor * float(total) / entries
    return {n: f.float() + level for n, f in fisher.items()}


class CurvaturePenalty:
    """R(theta) = 1/2 * (vec(D)^T F vec(D) + level * |D|^2), D = theta - theta0, F a `Curvature` (kfac,
    tri_kfac; stages/student/curvature.py), level = floor * mean diagonal of F. 0-dim float32 with
    gradient to the live parameters. ValueError if R comes out negative (F must be PSD)."""

    def __init__(self, model: torch.nn.Module, curvature: Curvature, floor: float) -> None:
        self.params = _trainable(model)
        if not self.params:
            raise ValueError("weight penalty: the model has no trainable parameters")
        self.anchor = {n: p.detach().clone() for n, p in self.params}
        device = self.params[0][1].device
        self.curvature = curvature.to(device, torch.float32)
        self.level = floor * curvature.mean_diagonal()

    def __call__(self) -> torch.Tensor:
        deltas = {n: p.float() - self.anchor[n].float() for n, p in self.params}
        value = self.curvature.quadratic(deltas) + self.level * sum((d * d).sum() for d in deltas.values())
        if float(value.detach()) < -1e-6 * (1.0 + self.level):
            raise ValueError(f"lalora: the curvature penalty is negative ({float(value.detach()):.3g}): the {self.curvature.kind} "
                             "curvature is not positive semi-definite")
        return _finite(0.5 * value)


def l2_penalty(train, model: torch.nn.Module, model_dir: str) -> WeightPenalty:
    """`l2`: the distance of the trainable weights from their current values (build before any step)."""
    return WeightPenalty(model)


def lalora_penalty(train, model: torch.nn.Module, model_dir: str) -> WeightPenalty | CurvaturePenalty:
    """`lalora`: the floored curvature `train.lalora_curvature` of `train.fisher_data` (a TrainConfig) at the
    current weights, from the curvature store when an identical one was computed (stages/student/curvature_store.py).
    The penalty's `report` says where it came from and what it cost."""
    from stages.student.curvature_store import cached_curvature

    if not train.fisher_data:
        raise ValueError("train.fisher_data: required by method 'lalora'")

    def compute() -> Curvature:
        examples = fisher_examples(train.fisher_data, model_dir, train.fisher_texts, train.fisher_max_length)
        if len(examples) < train.fisher_texts:
            what = (f"train.fisher_batches={train.fisher_batches} x train.batch_size={train.batch_size}" if train.fisher_batches
                    else f"train.fisher_examples={train.fisher_examples}")
            raise ValueError(f"train.fisher_data: {train.fisher_data} holds {len(examples)} texts; {what} asks for "
                             f"{train.fisher_texts}: lower it or give more source text")
        return estimate_curvature(model, examples, train.lalora_curvature)

    curvature, report = cached_curvature(train, model, model_dir, compute)
    penalty = penalty_from_curvature(model, curvature, train.fisher_floor)
    penalty.report = report
    return penalty


def penalty_from_curvature(model: torch.nn.Module, curvature: Curvature, floor: float) -> WeightPenalty | CurvaturePenalty:
    """lalora's penalty for a raw `curvature`, anchored at the model's current weights: the floored diagonal
    (`WeightPenalty`) for diag, `CurvaturePenalty` for kfac / tri_kfac."""
    if curvature.kind == "diag":
        level = floor * curvature.mean_diagonal()
        return WeightPenalty(model, {n: f.float() + level for n, f in curvature.diagonal.items()})
    return CurvaturePenalty(model, curvature, floor)
