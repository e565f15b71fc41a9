"""Weight-space forgetting baselines: penalties on the LoRA parameters, no teacher, no KL.

    train.method = l2       loss = CE + reg_weight * 1/2 * sum_i (theta_i - theta0_i)^2
    train.method = lalora   loss = CE + reg_weight * 1/2 * sum_i F_i (theta_i - theta0_i)^2

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
import torch.nn.functional as F

from stages.data.inputs import DataConfig, load_rows, tokenize_rows

__all__ = ["WeightPenalty", "empirical_fisher", "fisher_examples", "l2_penalty", "lalora_penalty"]


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


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
        return 0.5 * total


def fisher_examples(path: str, model_dir: str, examples: int, max_length: int):
    """The first `examples` texts of `path`, tokenized with the student's tokenizer (stages.data.inputs)."""
    from transformers import AutoTokenizer

    cfg = DataConfig(path=path, max_length=max_length, max_examples=examples)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        return tokenize_rows(load_rows(cfg), tokenizer, cfg)
    except (OSError, ValueError) as err:  # stages.data.inputs names "data.path": say which key it was
        raise ValueError(f"train.fisher_data: {err}") from err


def empirical_fisher(model: torch.nn.Module, examples, floor: float = 0.1) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher of the mean-token CE w.r.t. the trainable parameters, floored.

    `examples`: `stages.data.inputs.Example`s (input_ids [T], loss_mask [T-1]). One forward/backward per
    example at the current parameters, eval mode; the model's .grad fields are left as they were.
    Returns {name: F_i + floor * mean(F)} in float32 (see the module doc for why the floor).
    """
    params = _trainable(model)
    saved_grads = {n: p.grad for n, p in params}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    device = params[0][1].device
    was_training = model.training
    model.eval()
    count = 0
    try:
        for example in examples:
            ids = torch.as_tensor(example.input_ids, dtype=torch.long, device=device)[None]
            mask = torch.as_tensor(example.loss_mask, dtype=torch.bool, device=device)
            if not bool(mask.any()):
                continue
            logits = model(input_ids=ids).logits[0, :-1][mask]
            ce = F.cross_entropy(logits.float(), ids[0, 1:][mask])
            grads = torch.autograd.grad(ce, [p for _, p in params], allow_unused=True)
            for (n, _), g in zip(params, grads):
                if g is not None:
                    sums[n] += g.float() ** 2
            count += 1
    finally:
        model.train(was_training)
        for n, p in params:
            p.grad = saved_grads[n]
    if count == 0:
        raise ValueError("train.fisher_data: no example with a trained position")
    fisher = {n: s / count for n, s in sums.items()}
    total = sum(f.sum() for f in fisher.values())
    entries = sum(f.numel() for f in fisher.values())
    level = floor * float(total) / entries
    return {n: f + level for n, f in fisher.items()}


def l2_penalty(train, model: torch.nn.Module, model_dir: str) -> WeightPenalty:
    """`l2`: the distance of the trainable weights from their current values (build before any step)."""
    return WeightPenalty(model)


def lalora_penalty(train, model: torch.nn.Module, model_dir: str) -> WeightPenalty:
    """`lalora`: the floored diagonal Fisher of `train.fisher_data` (a TrainConfig) at the current weights."""
    if not train.fisher_data:
        raise ValueError("train.fisher_data: required by method 'lalora'")
    examples = fisher_examples(train.fisher_data, model_dir, train.fisher_examples, train.fisher_max_length)
    return WeightPenalty(model, empirical_fisher(model, examples, train.fisher_floor))
