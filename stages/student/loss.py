"""The Mask-the-Target regularizer and its cached estimators: pure functions of tensors.

Notation (docs/design.md §1-5), at each trained position: `y` the target, `a` teacher log-probs,
`b` student log-probs, tilde = renormalized over the non-target vocabulary v != y,
`S` the k cached non-target ids (teacher's largest), `R_T`/`R_S` the teacher/student mass of the
non-target tokens outside S.

All functions take the N trained positions of a batch flattened to rows and return a per-position
regularizer [N] in float32; `regularized_loss` sums and normalizes. Student logits may be any float
dtype: they are upcast once, and every `log(1 - p)` goes through `log1mexp`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "CachedTeacher", "log1mexp", "cached_kl", "live_masked_kl", "regularized_loss", "LossParts", "CACHED_ESTIMATORS",
    "StudentStats", "student_stats", "kl_from_stats", "binary_kl", "decomposition_sums", "sampled_tail_kl",
    "DRAW_ESTIMATORS",
]

CACHED_ESTIMATORS = ("tail", "topk", "full_kl", "sampled_tail")
DRAW_ESTIMATORS = ("sampled_tail",)  # the estimators that read the tail draws (caches of an encoding with tail_draws)
_LN_HALF = -math.log(2.0)


@dataclass
class CachedTeacher:
    """What stage one stored for N trained positions.

    topk_ids:       [N, k] long   non-target ids, descending teacher probability
    topk_logprobs:  [N, k] float  their teacher log-probs a_S (full-vocabulary, not renormalized)
    target_logprob: [N]    float  teacher log-prob of the target, a_y
    draw_ids:       [N, m] long   ids drawn i.i.d. from the teacher's tail p(v) / R_T, v not in S + {y}
                                  (caches with tail draws; `sampled_tail`), else None
    tail_entropy:   [N]    float  the entropy of that within-tail distribution, nats (with draw_ids)
    """

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    target_logprob: torch.Tensor
    draw_ids: torch.Tensor | None = None
    tail_entropy: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "CachedTeacher":
        return CachedTeacher(*(t.to(device, non_blocking=True) if t is not None else None for t in
                               (self.topk_ids, self.topk_logprobs, self.target_logprob, self.draw_ids, self.tail_entropy)))

    def gathered_ids(self, estimator: str | None) -> torch.Tensor:
        """[N, k (+ m)] long: the ids whose student logits `estimator` reads (the head, then the draws)."""
        if estimator in DRAW_ESTIMATORS:
            if self.draw_ids is None or self.tail_entropy is None:
                raise ValueError(f"estimator {estimator!r} needs the cache's tail draws: a cache written with an encoding "
                                 "that has tail_draws (e.g. cache.encoding=topk_idd_rel4q112_draws16)")
            return torch.cat([self.topk_ids.long(), self.draw_ids.long()], -1)
        return self.topk_ids.long()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate at both ends (Mächler 2012).

    Near 0 (p -> 1) use log(-expm1(x)); far below use log1p(-exp(x)). x == 0 gives -inf.
    """
    x = x.clamp(max=0.0)
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _xlogy_ratio(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) elementwise, 0 where p == 0 (log_p is the teacher: no gradient through p).

    The difference is masked before the product so a -inf in an unused branch never meets a 0
    in the backward pass (which would give NaN gradients).
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return p * diff


def _logsumexp_without(logits: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """log-sum-exp of each row of `logits` [N, V] over the ids not in `excluded` [N, m] -> [N]."""
    return logits.scatter(-1, excluded, float("-inf")).logsumexp(-1)


def _teacher_nontarget_logmass(a_S: torch.Tensor, a_y: torch.Tensor) -> torch.Tensor:
    """log(1 - p_y) from the cache, never below log(sum_S p).

    When p_y rounds to 1 in float32 (a_y == 0), log1mexp(a_y) is -inf although the non-target
    tokens still have finite log-probs; the mass of S is a true lower bound of the non-target mass,
    so taking the max repairs that case and keeps sum_S p~ <= 1 under rounding.
    """
    return torch.maximum(log1mexp(a_y), a_S.logsumexp(-1))


@dataclass
class StudentStats:
    """The few reductions of the student logits z [N, V] that every cached estimator reads.

    The estimators are functions of these [N] / [N, k] tensors only, so the fused chunked loss
    (stages/student/fused_loss.py) can differentiate them on small tensors and expand the gradient
    to the logits itself: d/dz of a log-sum-exp is a softmax over the same ids.

    z_S         [N, k] the logits of the cached ids S (sampled_tail: [N, k + m], S then the draws)
    z_y         [N]    the target's logit
    log_Z       [N]    log-sum-exp over the whole vocabulary (full_kl, CE), else None
    log_Z_S     [N]    log-sum-exp over v != y, the non-target normalizer (tail, topk), else None
    log_Z_rest  [N]    log-sum-exp over v not in S + {y} (tail, full_kl; only when S + {y} is not V), else None
    has_tail    whether any non-target id lies outside S (k < V - 1)
    """

    z_S: torch.Tensor
    z_y: torch.Tensor
    log_Z: torch.Tensor | None
    log_Z_S: torch.Tensor | None
    log_Z_rest: torch.Tensor | None
    has_tail: bool


def student_stats(z: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, estimator: str | None,
                  with_log_Z: bool = False) -> StudentStats:
    """The reductions `estimator` needs from float logits z [N, V] (plus log_Z if `with_log_Z`, for CE).

    estimator None: CE only (z_S is then empty). Each log-sum-exp costs one pass over [N, V].
    """
    if estimator is not None and estimator not in CACHED_ESTIMATORS:
        raise ValueError(f"estimator {estimator!r} is not a cache estimator; choose from {CACHED_ESTIMATORS}")
    y = targets[:, None]
    has_tail = ids.shape[-1] < z.shape[-1] - 1
    need_rest = has_tail and estimator in ("tail", "full_kl")  # sampled_tail reads log_Z_S only
    return StudentStats(
        z_S=z.gather(-1, ids), z_y=z.gather(-1, y).squeeze(-1),
        log_Z=z.logsumexp(-1) if with_log_Z or estimator == "full_kl" else None,
        # Student non-target normalizer straight from the logits: exact even when q_y rounds to 1.
        log_Z_S=_logsumexp_without(z, y) if estimator in ("tail", "topk", "sampled_tail") else None,
        log_Z_rest=_logsumexp_without(z, torch.cat([ids, y], -1)) if need_rest else None,
        has_tail=has_tail,
    )


def cached_kl(student_logits: torch.Tensor, targets: torch.Tensor, teacher: CachedTeacher, estimator: str = "tail") -> torch.Tensor:
    """Per-position regularizer from student logits and the cached teacher.

    student_logits: [N, V] (any float dtype), targets: [N] long -> [N] float32.

    tail    (default) masked KL over S plus one bucket for the rest; exact when k = V - 1,
            and a lower bound of the exact masked KL otherwise (log-sum inequality).
    topk    masked KL with both distributions renormalized over S alone (biased; for comparison).
    full_kl ordinary, unmasked KL(p || q) over the categories S + {y} + rest.
    sampled_tail  masked KL over S exactly, plus the tail term estimated from the m cached draws (unbiased:
            `sampled_tail_kl`); needs a cache with tail draws.
    """
    stats = student_stats(student_logits.float(), targets, teacher.gathered_ids(estimator), estimator)
    return kl_from_stats(stats, teacher, estimator)


def kl_from_stats(s: StudentStats, teacher: CachedTeacher, estimator: str) -> torch.Tensor:
    """`cached_kl` from the student's reductions (`student_stats`) -> [N] float32."""
    a_S, a_y = teacher.topk_logprobs.float(), teacher.target_logprob.float()
    if estimator == "full_kl":
        return _full_kl(s, a_S, a_y)
    lq_S = s.z_S - s.log_Z_S[:, None]
    lp_S = a_S - _teacher_nontarget_logmass(a_S, a_y)[:, None]
    if estimator == "sampled_tail":
        k = a_S.shape[-1]
        return sampled_tail_kl(lp_S, lq_S[:, :k], lq_S[:, k:], teacher.tail_entropy.float())
    if estimator == "topk":
        lp_hat = lp_S - lp_S.logsumexp(-1, keepdim=True)
        lq_hat = lq_S - lq_S.logsumexp(-1, keepdim=True)
        return _xlogy_ratio(lp_hat, lq_hat).sum(-1)
    kl_S = _xlogy_ratio(lp_S, lq_S).sum(-1)
    if not s.has_tail:  # S is the whole non-target vocabulary
        return kl_S
    log_R_T = log1mexp(lp_S.logsumexp(-1))
    log_R_S = s.log_Z_rest - s.log_Z_S
    return kl_S + _xlogy_ratio(log_R_T, log_R_S)


def sampled_tail_kl(lp_S: torch.Tensor, lq_S: torch.Tensor, lq_draws: torch.Tensor, tail_entropy: torch.Tensor) -> torch.Tensor:
    """The masked KL D with its tail term estimated from draws: exact over S, unbiased over the tail.

    lp_S, lq_S [N, k]: teacher / student log p~ of the cached ids (renormalized over v != y); lq_draws
    [N, m]: student log q~ of m ids drawn i.i.d. from the teacher's within-tail distribution p_T(v) =
    p~_v / R_T (v outside S + {y}, R_T = 1 - sum_S p~); tail_entropy [N]: H_T = -sum_T p_T log p_T (nats).
    Returns [N] float32:

        D^ = sum_S p~ log(p~ / q~) + R_T (log R_T - H_T - (1/m) sum_j log q~_{v_j})

    Since sum_T p~ log p~ = R_T (log R_T - H_T), E[D^] = D exactly (for the teacher as cached: a quantized
    head's R_T = 1 - sum_S p~ is the cached one, the tail's shape the engine's); its gradient w.r.t. the student
    logits is q~ - w with w = p~ on S and R_T x (draw count / m) on the draws, so the tail gets the teacher's
    shape in expectation where the `tail` bucket only fixes its total. Variance over the draws, for a fixed
    student: R_T^2 Var_{v ~ p_T}(log q~_v) / m. (Sparse-logit sampling: Anshumann et al., ACL 2025.)
    """
    kl_S = _xlogy_ratio(lp_S, lq_S).sum(-1)
    log_R_T = log1mexp(lp_S.logsumexp(-1))
    R_T = log_R_T.exp()
    inner = torch.where(R_T > 0, log_R_T - tail_entropy, torch.zeros_like(R_T)) - lq_draws.mean(-1)
    return kl_S + R_T * inner


def _full_kl(s: StudentStats, a_S: torch.Tensor, a_y: torch.Tensor) -> torch.Tensor:
    """Unmasked KL over the categories S, the target, and (if any) one bucket for the rest."""
    a_cat = torch.cat([a_S, a_y[:, None]], -1)
    b_cat = torch.cat([s.z_S, s.z_y[:, None]], -1) - s.log_Z[:, None]
    kl = _xlogy_ratio(a_cat, b_cat).sum(-1)
    if not s.has_tail:
        return kl
    log_rest_T = log1mexp(a_cat.logsumexp(-1))
    log_rest_S = s.log_Z_rest - s.log_Z
    return kl + _xlogy_ratio(log_rest_T, log_rest_S)


def live_masked_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The exact masked KL D(t) over the full vocabulary (the reference the cache replaces).

    student_logits, teacher_logits: [N, V]; targets: [N] -> [N] float32. No gradient flows into
    the teacher. Both non-target normalizers come from the logits with the target excluded.
    """
    y = targets[:, None]
    za, zb = teacher_logits.detach().float(), student_logits.float()
    lp = za - _logsumexp_without(za, y)[:, None]
    lq = zb - _logsumexp_without(zb, y)[:, None]
    lp = lp.scatter(-1, y, float("-inf"))  # the target has no mass in the masked distribution
    return _xlogy_ratio(lp, lq).sum(-1)


def binary_kl(log_q_y: torch.Tensor, a_y: torch.Tensor) -> torch.Tensor:
    """KL(Bern(p_y) || Bern(q_y)) per position: the target-vs-rest term of the decomposition

        KL(p || q) = KL(Bern(p_y) || Bern(q_y)) + (1 - p_y) D        (docs/design.md; DKD, Zhao et al., CVPR 2022)

    that masking the target drops. log_q_y, a_y: [N] student / teacher log-probs of the target -> [N] float32, >= 0.
    """
    a, b = a_y.float(), log_q_y.float()
    return _xlogy_ratio(a, b) + _xlogy_ratio(log1mexp(a), log1mexp(b))


def decomposition_sums(per_token: torch.Tensor, log_q_y: torch.Tensor, a_y: torch.Tensor, estimates: str) -> torch.Tensor | None:
    """[2] float32, detached: (sum of the binary term, sum of the full KL) over N positions, for the logged
    `binary_share` (the binary term's share of the full KL). The full KL is the regularizer itself when it
    `estimates` "full_kl", else B + (1 - p_y) * regularizer ("masked_kl": the regularizer estimates D);
    None for any other regularizer. per_token, log_q_y, a_y: [N]."""
    if estimates not in ("masked_kl", "full_kl"):
        return None
    with torch.no_grad():
        binary = binary_kl(log_q_y, a_y)
        full = per_token.float() if estimates == "full_kl" else binary + log1mexp(a_y.float()).exp() * per_token.float()
        return torch.stack([binary.sum(), full.sum()])


@dataclass
class LossParts:
    """What the loss of a micro-batch returns; everything but `loss` is detached, for logging.

    loss         (sum CE + reg_weight * sum regularizer) / n_items (+ reg_weight * penalty share, CacheLossMixin)
    ce           mean per-token CE
    regularizer  mean per-token regularizer (0 for a method without one)
    penalty      the unweighted weight penalty R(theta) of the step (0 for a method without one)
    n_tokens     labelled positions in the micro-batch
    decomposition  [2]: sums of the binary term and of the full KL (`decomposition_sums`), or None
    """

    loss: torch.Tensor
    ce: torch.Tensor
    regularizer: torch.Tensor
    penalty: torch.Tensor
    n_tokens: int
    decomposition: torch.Tensor | None = None


def regularized_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    kl_per_token: torch.Tensor | None,
    reg_weight: float,
    num_items: int | torch.Tensor | None = None,
    teacher_target_logprob: torch.Tensor | None = None,
    estimates: str = "",
) -> LossParts:
    """CE + reg_weight * regularizer over the N trained positions, normalized by the labelled-token count.

    student_logits [N, V], targets [N], kl_per_token [N] or None (plain LoRA).
    `num_items` is the labelled-token count of the whole optimizer step (all micro-batches): pass it
    under gradient accumulation so the accumulated gradient equals the full-batch one; it defaults
    to N. Clamped to >= 1 so an all-prompt batch gives zero loss, not NaN. `teacher_target_logprob` [N]
    (a_y) and the regularizer's `estimates` ("masked_kl" / "full_kl") add the logged decomposition.
    """
    n = targets.numel()
    denom = torch.as_tensor(n if num_items is None else num_items, device=student_logits.device).clamp_min(1)
    ce_per_token = F.cross_entropy(student_logits.float(), targets, reduction="none")  # -log q_y, also the decomposition's
    ce_sum = ce_per_token.sum()
    kl_sum = kl_per_token.sum() if kl_per_token is not None else ce_sum.new_zeros(())
    loss = (ce_sum + reg_weight * kl_sum) / denom
    count = max(n, 1)
    decomposition = None
    if kl_per_token is not None and teacher_target_logprob is not None:
        decomposition = decomposition_sums(kl_per_token, -ce_per_token.detach(), teacher_target_logprob, estimates)
    return LossParts(loss=loss, ce=ce_sum.detach() / count, regularizer=kl_sum.detach() / count,
                     penalty=ce_sum.new_zeros(()), n_tokens=n, decomposition=decomposition)
