"""An independent float64 reference for the cached estimators, written from docs/design.md §1-§4.

    from reference_kl import reference_kl, reference_loss
    d = reference_kl(student_logits.double(), targets, ids, logprobs, target_logprob, "tail")   # [N] float64

Written from the formulas in the design doc, in probability space where float64 allows it, and
deliberately NOT from stages/student/loss.py (no log-sum-exp tricks, no shared helpers): a test that
compares the code with this function compares two derivations of one formula. Differentiable in
`student_logits` (plain autograd in float64), so it also gives the reference gradients.

Assumes a well-formed cache (design doc §3): the k ids of a row are distinct, none is the target,
and the teacher's non-target mass 1 - p_y is not below the cached mass sum_S p (no p_y that rounded
to 1; that repair is a §5 numerics matter, not a formula). It refuses other inputs with ValueError.
"""
from __future__ import annotations

import torch

__all__ = ["REFERENCE_METHODS", "reference_kl", "reference_loss"]

REFERENCE_METHODS = ("tail", "topk", "full_kl")


def reference_kl(student_logits: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor,
                 topk_logprobs: torch.Tensor, target_logprob: torch.Tensor, method: str) -> torch.Tensor:
    """Per-position regularizer of `method` in float64.

    student_logits [N, V] float64 (gradients flow), targets [N] long, topk_ids [N, k] long (the cached
    non-target ids S), topk_logprobs [N, k] (teacher log-probs a_S, full-vocabulary), target_logprob
    [N] (a_y) -> [N] float64. tail / topk: the masked KL estimators; full_kl: the unmasked one.
    Raises ValueError on an unknown method, a float32 student, or a malformed cache.
    """
    if method not in REFERENCE_METHODS:
        raise ValueError(f"method {method!r}: choose from {REFERENCE_METHODS}")
    if student_logits.dtype != torch.float64:
        raise ValueError(f"student_logits: expected float64, got {student_logits.dtype}")
    rows = [_one_position(z, int(y), ids, a_S.double(), a_y.double(), method)
            for z, y, ids, a_S, a_y in zip(student_logits, targets, topk_ids.long(), topk_logprobs, target_logprob)]
    return torch.stack(rows) if rows else student_logits.new_zeros(0)


def reference_loss(student_logits: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   target_logprob: torch.Tensor, method: str, weight: float, num_items: int | None = None):
    """(loss, ce_mean, kl_mean) in float64, averaged as design doc §1 says.

    loss = (sum_t CE(t) + weight * sum_t D(t)) / num_items with CE(t) = -log q_y and num_items
    defaulting to N (the labelled-token count of the step); ce_mean / kl_mean are the per-token means
    over the N positions given (what the trainer logs).
    """
    n = targets.numel()
    q = torch.softmax(student_logits, -1)
    ce = -torch.log(q.gather(-1, targets[:, None]).squeeze(-1))
    kl = reference_kl(student_logits, targets, topk_ids, topk_logprobs, target_logprob, method)
    loss = (ce.sum() + weight * kl.sum()) / max(n if num_items is None else num_items, 1)
    return loss, ce.sum() / max(n, 1), kl.sum() / max(n, 1)


# --- one position --------------------------------------------------------------------------------
def _kl_terms(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum p * log(p / q) over categories, a term with p == 0 contributing 0 (its limit)."""
    used = p > 0
    return (p[used] * torch.log(p[used] / q[used])).sum()


def _one_position(z: torch.Tensor, y: int, ids: torch.Tensor, a_S: torch.Tensor, a_y: torch.Tensor, method: str) -> torch.Tensor:
    vocab = z.numel()
    in_S = torch.zeros(vocab, dtype=torch.bool)
    in_S[ids] = True
    if len(set(ids.tolist())) != ids.numel() or in_S[y]:
        raise ValueError("topk_ids: a row repeats an id or holds its target (design doc §3 forbids both)")
    in_tail = ~in_S
    in_tail[y] = False
    tail_ids = in_tail.nonzero().squeeze(-1)

    q = torch.softmax(z, 0)                          # §1: student q_v = exp(b_v), over all of V
    p_S, p_y = torch.exp(a_S), torch.exp(a_y)        # §3: the cached teacher probabilities
    if method == "full_kl":                          # §4 full_kl: KL(p || q) over S, {y}, {rest}
        p_rest = 1.0 - p_y - p_S.sum()
        q_rest = q[tail_ids].sum()
        p_cat = torch.cat([p_S, p_y[None], p_rest[None].clamp(min=0.0)]) if tail_ids.numel() else torch.cat([p_S, p_y[None]])
        q_cat = torch.cat([q[ids], q[y][None], q_rest[None]]) if tail_ids.numel() else torch.cat([q[ids], q[y][None]])
        return _kl_terms(p_cat, q_cat)

    # §1: remove the target from both and renormalize: p~_v = p_v / (1 - p_y), q~_v = q_v / (1 - q_y).
    # 1 - p_y is written -expm1(a_y) (the same number, without float64 cancellation when p_y is near 1);
    # the student's non-target mass is the sum of its non-target probabilities, never 1 - q_y.
    nontarget_p = -torch.expm1(a_y)
    if nontarget_p < p_S.sum() * (1 - 1e-6):
        raise ValueError(f"cache: 1 - p_y = {float(nontarget_p):.3g} is below the cached mass {float(p_S.sum()):.3g}")
    pt_S = p_S / nontarget_p
    nontarget_q = q[ids].sum() + q[tail_ids].sum()
    qt_S = q[ids] / nontarget_q
    if method == "topk":                             # §4 topk: renormalize both over S alone
        return _kl_terms(pt_S / pt_S.sum(), qt_S / qt_S.sum())
    # §4 tail: S plus one bucket holding the rest of the non-target mass, R_T and R_S.
    if tail_ids.numel() == 0:                        # k = |V| - 1: no tail, D_k = D(t)
        return _kl_terms(pt_S, qt_S)
    R_T = (1.0 - pt_S.sum()).clamp(min=0.0)
    R_S = q[tail_ids].sum() / nontarget_q
    return _kl_terms(torch.cat([pt_S, R_T[None]]), torch.cat([qt_S, R_S[None]]))
