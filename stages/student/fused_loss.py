"""CE + lambda * cached KL straight from the last hidden state, chunked: never [N, V] logits at once.

    python -m pipeline train --config configs/demo.yaml train.fused_loss=true

    from stages.student.fused_loss import chunked_regularized_loss
    parts = chunked_regularized_loss(hidden, model.lm_head.weight, targets, teacher, kl_weight=1.0)

Same value and gradients as `regularized_loss(hidden @ W.T + b, targets, cached_kl(...))` (loss.py),
computed the Liger-kernel way: a `torch.autograd.Function` whose forward walks the N labelled rows in
chunks of C, and for each chunk computes the logits, the loss AND the loss's gradient w.r.t. those
logits, multiplies it out into grad_hidden[chunk] = G @ W (and grad_W += G.T @ chunk when W is
trained), and drops the chunk. Backward only scales the stored gradients by grad_output.

How the chunk's gradient is found: every cached estimator is a function of a few reductions of the
float32 logits z (loss.StudentStats: the gathered z_S, z_y and up to three log-sum-exps). Those
small [C] / [C, k] tensors are differentiated with autograd through loss.py's own `kl_from_stats`
(the very code the unfused path runs), and expanded to the logits analytically:
    dL/dz = g_logZ * softmax(z) + g_logZ_S * softmax_{v != y}(z) + g_rest * softmax_{v not in S+y}(z)
            + scatter(S, g_zS) + scatter(y, g_zy)
(d logsumexp / dz is the softmax over the same ids; CE = log_Z - z_y contributes to g_logZ, g_zy).

Memory arithmetic (N labelled positions, vocabulary V, hidden H, compute dtype bf16; sizes in bytes;
for the GPU target shape N = 8 x 1023, V = 151,936: one bf16 [N, V] = 2.3 GiB, one fp32 [N, V] = 4.6 GiB):
  unfused, CE only (`model(...).logits`, then `regularized_loss`):
    logits [B, T, V] bf16 (2NV; the lm_head output; the labelled gather `logits[mask]` makes
    another 2NV copy while the first is still referenced), the float32 upcast (4NV), and
    cross_entropy's log_softmax output saved for backward (4NV): ~10-12NV alive at the end of the
    forward, and in backward the fp32 gradient of log_softmax (4NV) + its input gradient (4NV) +
    the bf16 cast (2NV) on top of what is not yet freed: a peak of ~12-16NV (~28-37 GiB above).
  unfused, cached tail: the same, plus the estimator's fp32 temporaries that autograd keeps for
    backward (one `scatter` copy + the logsumexp result per complement, exp'd copies in backward):
    another 2-4 fp32 [N, V].
  fused (this module), any estimator: alive between forward and backward only grad_hidden [N, H]
    (hidden dtype; the same size as the hidden state the unfused lm_head saves for its own
    backward) and, if W is trained, grad_W [V, H] fp32. Transient, per chunk of C rows: the chunk's
    bf16 logits (2CV), the fp32 logits z (4CV), at most two more fp32 [C, V] buffers (a log-sum-exp
    temporary or a masked copy while reducing; a softmax term while building the gradient: tail
    has three softmax terms, CE only one) and the bf16 cast of the gradient (2CV): <= ~16CV, and
    the cast of W to the compute dtype when W is stored in another dtype (2VH).
    With C = 2048 and V = 151,936: ~4.6 GiB transient instead of ~30 GiB, independent of N.
Time: the same two big matmuls as unfused (logits, and G @ W for grad_hidden); no recomputation,
and fewer fp32 passes over [C, V] than autograd's log_softmax + estimator graph.

Logit softcapping or scaling between the hidden state and the logits is not modelled: the trainer
refuses models whose config declares one (stages/student/lm_head.py `output_head`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.student.loss import CACHED_ESTIMATORS, CachedTeacher, LossParts, StudentStats, kl_from_stats, student_stats

__all__ = ["chunked_regularized_loss", "auto_chunk_size"]


def auto_chunk_size(vocab_size: int, max_elements: int = 2**28) -> int:
    """Rows per chunk so that one fp32 [C, V] buffer stays <= `max_elements` (1 GiB): 256..4096, a multiple of 128."""
    return max(256, min(4096, max_elements // max(vocab_size, 1) // 128 * 128))


@dataclass(frozen=True)
class _Spec:
    estimator: str | None   # None: CE only
    kl_weight: float
    chunk_size: int
    compute_dtype: torch.dtype
    need_grad: bool


def chunked_regularized_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: CachedTeacher | None,
    kl_weight: float,
    estimator: str = "tail",
    num_items: int | torch.Tensor | None = None,
    chunk_size: int = 4096,
    lm_head_bias: torch.Tensor | None = None,
) -> LossParts:
    """CE + kl_weight * cached KL of the logits hidden @ W.T (+ b), never holding more than `chunk_size` rows of them.

    hidden [N, H] (any float dtype), lm_head_weight [V, H], targets [N] long, teacher arrays [N, k]
    (None: CE only, `estimator` ignored), lm_head_bias [V] or None. `num_items` as in
    `regularized_loss`. The logits are computed in the autocast dtype when autocast is on (as
    nn.Linear would), else in the promoted dtype of hidden and W; the loss maths is float32.
    """
    _check_inputs(hidden, lm_head_weight, targets, teacher, estimator, chunk_size, lm_head_bias)
    n = targets.numel()
    denom = torch.as_tensor(n if num_items is None else num_items, device=hidden.device).clamp_min(1).float()
    spec = _Spec(estimator if teacher is not None else None, float(kl_weight), chunk_size,
                 _compute_dtype(hidden, lm_head_weight), torch.is_grad_enabled())
    arrays = (teacher.topk_ids.long(), teacher.topk_logprobs, teacher.target_logprob) if teacher is not None else (None,) * 3
    loss, ce_sum, kl_sum = _ChunkedLoss.apply(hidden, lm_head_weight, lm_head_bias, targets, *arrays, denom, spec)
    count = max(n, 1)
    return LossParts(loss=loss, ce=ce_sum / count, kl=kl_sum / count, n_tokens=n)


def _check_inputs(hidden, weight, targets, teacher, estimator, chunk_size, bias) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and lm_head_weight {tuple(weight.shape)}: expected [N, H] and [V, H]")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets {tuple(targets.shape)}: expected [{hidden.shape[0]}] (one per hidden row)")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"lm_head_bias {tuple(bias.shape)}: expected [{weight.shape[0]}]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    if teacher is None:
        return
    if estimator not in CACHED_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is not a cache estimator; choose from {CACHED_ESTIMATORS}")
    if teacher.topk_ids.shape[0] != hidden.shape[0] or teacher.target_logprob.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {teacher.target_logprob.shape[0]} cached positions")


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


# --- the autograd function -----------------------------------------------------------------------
class _ChunkedLoss(torch.autograd.Function):
    """Forward: loss, CE sum, KL sum, with the input gradients computed on the way; backward: scale them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ids, a_S, a_y, denom, spec: _Spec):
        want = [spec.need_grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        grad_h = torch.empty_like(hidden) if want[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want[2] else None
        sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)  # CE, KL
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(spec.compute_dtype)
            b = bias.to(spec.compute_dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], spec.chunk_size):
                rows = slice(start, start + spec.chunk_size)
                x = hidden[rows].to(spec.compute_dtype)
                teacher = CachedTeacher(ids[rows], a_S[rows], a_y[rows]) if ids is not None else None
                ce, kl, grad = _chunk(x, w, b, targets[rows], teacher, denom, spec, any(want))
                sums += torch.stack([ce, kl])
                if grad is None:
                    continue
                if grad_b is not None:
                    grad_b += grad.sum(0)
                grad = grad.to(spec.compute_dtype)
                if grad_h is not None:
                    grad_h[rows] = grad @ w
                if grad_w is not None:
                    grad_w += (grad.t() @ x).float()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_h, grad_w, grad_b)))
        ctx.want, ctx.dtypes = want, (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ce_sum, kl_sum = sums[0].clone(), sums[1].clone()  # own tensors (not views): logging only
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return (ce_sum + spec.kl_weight * kl_sum) / denom, ce_sum, kl_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        grads = [g.mul(grad_loss).to(dtype) if want else None
                 for g, want, dtype in zip(ctx.saved_tensors, ctx.want, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)


# --- one chunk ------------------------------------------------------------------------------------
def _chunk(x, w, b, targets, teacher, denom, spec: _Spec, want_grad: bool):
    """(CE sum, KL sum, d loss / d logits [C, V] float32 or None) for one chunk of rows."""
    logits = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
    z = logits.float()
    del logits  # the fp32 copy is all we need (a no-op when the compute dtype is float32)
    ids = teacher.topk_ids if teacher is not None else targets.new_zeros(targets.shape[0], 0)
    stats = student_stats(z, targets, ids, spec.estimator, with_log_Z=True)
    leaves = _small_leaves(stats, want_grad)
    with torch.enable_grad():
        ce = (stats.log_Z - stats.z_y).sum()
        kl = kl_from_stats(stats, teacher, spec.estimator).sum() if teacher is not None else ce.new_zeros(())
        if not want_grad:
            return ce, kl, None
        # Scaled by 1/denom here, in fp32, so the compute-dtype cast sees the same values as unfused.
        partials = torch.autograd.grad((ce + spec.kl_weight * kl) / denom, [t for _, t in leaves], allow_unused=True)
    return ce.detach(), kl.detach(), _logits_grad(z, targets, ids, stats, dict(zip([n for n, _ in leaves], partials)))


def _small_leaves(stats: StudentStats, want_grad: bool) -> list[tuple[str, torch.Tensor]]:
    """Turn the reductions into autograd leaves (in place on `stats`); their (name, tensor) pairs."""
    leaves = []
    for name in ("z_S", "z_y", "log_Z", "log_Z_S", "log_Z_rest"):
        value = getattr(stats, name)
        if value is not None and want_grad:
            value = value.detach().requires_grad_(True)
            setattr(stats, name, value)
            leaves.append((name, value))
    return leaves


def _logits_grad(z: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, stats: StudentStats,
                 partials: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Expand the reductions' gradients to d/dz [C, V]: one masked softmax per log-sum-exp, then the gathers.

    Consumes z: the last softmax term is built in place in it, so at most three [C, V] fp32 buffers live.
    """
    y = targets[:, None]
    terms = [(stats.log_Z, partials.get("log_Z"), None),
             (stats.log_Z_S, partials.get("log_Z_S"), y),
             (stats.log_Z_rest, partials.get("log_Z_rest"), torch.cat([ids, y], -1) if stats.log_Z_rest is not None else None)]
    terms = [(norm.detach(), g, excluded) for norm, g, excluded in terms if norm is not None and g is not None]
    grad = None
    for i, (norm, g, excluded) in enumerate(terms):
        last = i == len(terms) - 1
        term = (z.sub_(norm[:, None]) if last else z - norm[:, None]).exp_()  # softmax over the kept ids
        if excluded is not None:
            term.scatter_(-1, excluded, 0.0)
        term.mul_(g[:, None])
        grad = term if grad is None else grad.add_(term)
        del term
    if grad is None:  # no log-sum-exp term (cannot happen with CE, kept for safety)
        grad = torch.zeros_like(z)
    if partials.get("z_S") is not None and ids.shape[-1]:
        grad.scatter_add_(-1, ids, partials["z_S"])
    if partials.get("z_y") is not None:
        grad.scatter_add_(-1, y, partials["z_y"][:, None])
    return grad
