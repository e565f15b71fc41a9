"""CE + lambda * cached KL straight from the last hidden state, chunked: never [N, V] logits at once.

    python -m pipeline train --config configs/demo.yaml train.fused_loss=true

    from stages.student.fused_loss import chunked_regularized_loss
    parts = chunked_regularized_loss(hidden, model.lm_head.weight, targets, teacher, reg_weight=1.0)

Same value and gradients as `regularized_loss(hidden @ W.T + b, targets, cached_kl(...))` (loss.py),
computed the Liger-kernel way: a `torch.autograd.Function` whose forward walks the N labelled rows in
chunks of C, and for each chunk computes the logits, the loss AND the loss's gradient w.r.t. those
logits, multiplies it out into grad_hidden[chunk] = G @ W (and grad_W += G.T @ chunk when W is
trained), and drops the chunk. Backward only scales the stored gradients by grad_output.

How the chunk's gradient is found, with ONE fp32 [C, V] buffer: every cached estimator (and CE) is
a function of a few reductions of the float32 logits z (loss.StudentStats). Here they all come from
the gathered z_S [C, k], z_y [C] and one dense reduction, the log-sum-exp over the "rest" (ids not in
S + {y}): the buffer is scattered to -inf at S + {y}, e = exp(z - max) in place, summed. Then, on
small tensors and differentiably, log_Z_S = logaddexp(log_Z_rest, logsumexp(z_S)) and
log_Z = logaddexp(log_Z_S, z_y) (sums of positive terms: no cancellation, exact when q_y rounds to
1), and loss.py's own `kl_from_stats` (the code the unfused path runs) gives the loss; autograd on
those [C] / [C, k] tensors gives g_rest, g_S, g_y, and the logits' gradient is
    dL/dz_v = g_rest * e_v / sum(e)   (v in the rest; in place in the buffer)
    dL/dz_S = g_S,  dL/dz_y = g_y     (scattered in; e is 0 there)
About 8 passes over the buffer (upcast, max, subtract, exp, sum, scale, downcast) where autograd
through log_softmax + the estimator makes ~30.

Memory arithmetic (N labelled positions, vocabulary V, hidden H, compute dtype bf16; one "NV" =
N x V bytes; for the GPU target shape N = 8 x 1023, V = 151,936: NV = 1.16 GiB):
  unfused, CE only (`model(...).logits`, then `regularized_loss`). Forward: the lm_head output
    [B, T, V] bf16 (2NV), its labelled rows `logits[mask]` (a bf16 copy, 2NV), the fp32 upcast
    (4NV) and cross_entropy's log_softmax output (4NV): ~12NV at the top. Kept for backward: the
    log_softmax output (4NV). Backward: NLL's fp32 gradient (4NV) and log_softmax's input gradient
    (4NV) next to the saved output, then the bf16 cast (2NV) and a zero-filled [B, T, V] bf16 for
    the labelled-row gather's backward (2NV): again ~12NV (~14 GiB above).
  unfused, cached tail: the same plus what autograd keeps for the estimator: the fp32 logits (saved
    by gather) and the two -inf-scattered copies under the complement log-sum-exps: 12NV more saved
    (16NV in all, counted with saved_tensors_hooks), and their exp'd gradients in backward.
  fused (this module), any estimator: nothing [N, V] is alive between forward and backward, only
    grad_hidden [N, H] (hidden dtype; the size of the hidden state the unfused lm_head saves) and,
    if W is trained, grad_W [V, H] fp32. Transient, per chunk of C rows: the bf16 logits (2CV), the
    fp32 buffer (4CV) and the bf16 cast of its gradient (2CV): <= 6CV at once, plus a cast of W to
    the compute dtype when W is stored in another one (2VH). With C = 1664 (`auto_chunk_size` for
    V = 151,936) that is ~1.4 GiB, whatever N, in place of ~14 GiB (CE only) or ~19+ GiB (tail).
Time: the same two big matmuls as unfused (logits; G @ W for grad_hidden), no recomputation, and
far fewer fp32 passes over [C, V].

Logit softcapping or scaling between the hidden state and the logits is not modelled: the trainer
refuses models whose config declares one (stages/student/lm_head.py `output_head`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from stages.student.loss import CACHED_ESTIMATORS, CachedTeacher, LossParts, StudentStats, decomposition_sums, kl_from_stats

__all__ = ["chunked_regularized_loss", "auto_chunk_size"]


def auto_chunk_size(vocab_size: int, max_elements: int = 2**28) -> int:
    """Rows per chunk so that one fp32 [C, V] buffer stays <= `max_elements` (1 GiB): 256..4096, a multiple of 128."""
    return max(256, min(4096, max_elements // max(vocab_size, 1) // 128 * 128))


@dataclass(frozen=True)
class _Spec:
    estimator: str | None   # None: CE only
    reg_weight: float
    chunk_size: int
    compute_dtype: torch.dtype
    need_grad: bool


def chunked_regularized_loss(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    teacher: CachedTeacher | None,
    reg_weight: float,
    estimator: str = "tail",
    num_items: int | torch.Tensor | None = None,
    chunk_size: int = 4096,
    lm_head_bias: torch.Tensor | None = None,
) -> LossParts:
    """CE + reg_weight * cached KL of the logits hidden @ W.T (+ b), never holding more than `chunk_size` rows of them.

    hidden [N, H] (any float dtype), lm_head_weight [V, H], targets [N] long, teacher arrays [N, k]
    (None: CE only, `estimator` ignored), lm_head_bias [V] or None. `num_items` as in
    `regularized_loss`. The logits are computed in the autocast dtype when autocast is on (as
    nn.Linear would), else in the promoted dtype of hidden and W; the loss maths is float32.
    """
    _check_inputs(hidden, lm_head_weight, targets, teacher, estimator, chunk_size, lm_head_bias)
    n = targets.numel()
    denom = torch.as_tensor(n if num_items is None else num_items, device=hidden.device).clamp_min(1).float()
    spec = _Spec(estimator if teacher is not None else None, float(reg_weight), chunk_size,
                 _compute_dtype(hidden, lm_head_weight), torch.is_grad_enabled())
    arrays = ((teacher.topk_ids.long(), teacher.topk_logprobs, teacher.target_logprob, teacher.draw_ids, teacher.tail_entropy)
              if teacher is not None else (None,) * 5)
    loss, ce_sum, kl_sum, decomposition = _ChunkedLoss.apply(hidden, lm_head_weight, lm_head_bias, targets, *arrays, denom, spec)
    count = max(n, 1)
    return LossParts(loss=loss, ce=ce_sum / count, regularizer=kl_sum / count, penalty=ce_sum.new_zeros(()), n_tokens=n,
                     decomposition=decomposition if teacher is not None else None)


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
    def forward(ctx, hidden, weight, bias, targets, ids, a_S, a_y, draw_ids, tail_entropy, denom, spec: _Spec):
        want = [spec.need_grad and t is not None and t.requires_grad for t in (hidden, weight, bias)]
        grad_h = torch.empty_like(hidden) if want[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want[1] else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want[2] else None
        sums = torch.zeros(4, dtype=torch.float32, device=hidden.device)  # CE, KL, binary term, full KL
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(spec.compute_dtype)
            b = bias.to(spec.compute_dtype) if bias is not None else None
            for start in range(0, hidden.shape[0], spec.chunk_size):
                rows = slice(start, start + spec.chunk_size)
                x = hidden[rows].to(spec.compute_dtype)
                teacher = None if ids is None else CachedTeacher(
                    ids[rows], a_S[rows], a_y[rows], *(t[rows] if t is not None else None for t in (draw_ids, tail_entropy)))
                ce, kl, decomposition, grad = _chunk(x, w, b, targets[rows], teacher, denom, spec, any(want))
                sums += torch.cat([torch.stack([ce, kl]), decomposition])
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
        ce_sum, kl_sum, decomposition = sums[0].clone(), sums[1].clone(), sums[2:].clone()  # own tensors: logging only
        ctx.mark_non_differentiable(ce_sum, kl_sum, decomposition)
        return (ce_sum + spec.reg_weight * kl_sum) / denom, ce_sum, kl_sum, decomposition

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_decomposition):
        grads = [g.mul(grad_loss).to(dtype) if want else None
                 for g, want, dtype in zip(ctx.saved_tensors, ctx.want, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None, None, None)


# --- one chunk ------------------------------------------------------------------------------------
def _chunk(x, w, b, targets, teacher, denom, spec: _Spec, want_grad: bool):
    """(CE sum, KL sum, [binary term sum, full KL sum] (zeros without a teacher), d loss / d logits [C, V]
    float32 or None) for one chunk of rows.

    One fp32 [C, V] buffer does everything: the logits, then exp(z - max) over the "rest" ids
    (not in S + {y}), then the gradient.
    """
    logits = torch.addmm(b, x, w.t()) if b is not None else x @ w.t()
    z = logits.float()
    del logits  # the fp32 copy is all we need (the same tensor when the compute dtype is float32)
    y = targets[:, None]
    ids = teacher.gathered_ids(spec.estimator) if teacher is not None else targets.new_zeros(targets.shape[0], 0)
    has_tail = ids.shape[-1] < z.shape[-1] - 1
    z_S, z_y = z.gather(-1, ids), z.gather(-1, y).squeeze(-1)
    rest_ids = torch.cat([ids, y], -1)
    log_Z_rest, rest_sum = _rest_logsumexp_(z, rest_ids)  # z now holds exp(z - max_rest), 0 at S + {y}
    leaves = [t.requires_grad_(want_grad) for t in (z_S, z_y, log_Z_rest)]
    with torch.enable_grad():
        stats = _stats(*leaves, ids, targets, has_tail)
        ce = (stats.log_Z - stats.z_y).sum()
        per_token = kl_from_stats(stats, teacher, spec.estimator) if teacher is not None else None
        kl = per_token.sum() if per_token is not None else ce.new_zeros(())
        decomposition = ce.new_zeros(2)
        if per_token is not None:
            estimates = "full_kl" if spec.estimator == "full_kl" else "masked_kl"  # tail and topk estimate D
            decomposition = decomposition_sums(per_token, (stats.z_y - stats.log_Z).detach(), teacher.target_logprob, estimates)
        if not want_grad:
            return ce, kl, decomposition, None
        # Scaled by 1/denom here, in fp32, so the compute-dtype cast sees the same values as unfused.
        g_S, g_y, g_rest = torch.autograd.grad((ce + spec.reg_weight * kl) / denom, leaves, allow_unused=True)
    # d/dz_v of log_Z_rest is exp(z_v - log_Z_rest) = e_v / rest_sum for v in the rest, 0 elsewhere.
    coef = torch.zeros_like(rest_sum) if g_rest is None else torch.where(rest_sum > 0, g_rest / rest_sum, 0.0)
    grad = z.mul_(coef[:, None])
    if g_S is not None:
        grad.scatter_add_(-1, ids, g_S)
    if g_y is not None:
        grad.scatter_add_(-1, y, g_y[:, None])
    return ce.detach(), kl.detach(), decomposition, grad


def _rest_logsumexp_(z: torch.Tensor, excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log-sum-exp of each row of z over the ids not in `excluded`, overwriting z with exp(z - max).

    Returns (log-sum-exp [C], sum [C] of the overwritten z); a row with no id left gives -inf and 0.
    """
    z.scatter_(-1, excluded, float("-inf"))
    top = z.amax(-1)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    total = z.sub_(shift[:, None]).exp_().sum(-1)
    return shift + total.log(), total


def _stats(z_S, z_y, log_Z_rest, ids, targets, has_tail: bool) -> StudentStats:
    """The normalizers from the rest's log-sum-exp and the gathered logits, differentiably.

    Sums of positive terms only (logaddexp), so as accurate as a log-sum-exp over the row. Ids that
    repeat in S or equal the target count once, as they do in the unfused log-sum-exps.
    """
    first = _first_occurrence(ids) & (ids != targets[:, None])
    lse_S = z_S.masked_fill(~first, float("-inf")).logsumexp(-1)
    log_Z_S = torch.logaddexp(log_Z_rest, lse_S)
    log_Z = torch.logaddexp(log_Z_S, z_y)
    return StudentStats(z_S, z_y, log_Z, log_Z_S, log_Z_rest if has_tail else None, has_tail)


def _first_occurrence(ids: torch.Tensor) -> torch.Tensor:
    """[C, k] bool: True at the first position of each distinct id in its row."""
    if ids.shape[-1] < 2:
        return torch.ones_like(ids, dtype=torch.bool)
    sorted_ids, order = ids.sort(dim=-1, stable=True)
    first_sorted = torch.ones_like(sorted_ids, dtype=torch.bool)
    first_sorted[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    return torch.empty_like(first_sorted).scatter_(-1, order, first_sorted)
