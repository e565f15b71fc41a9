"""The loss maths against the exact full-vocabulary reference (docs/design.md §1-5), on seeded logits."""
import math

import pytest
import torch

from stages.student.loss import CachedTeacher, cached_kl, live_masked_kl, log1mexp, regularized_loss

V, N = 50, 64


def cache_from_logits(teacher_logits: torch.Tensor, targets: torch.Tensor, k: int) -> CachedTeacher:
    """What stage one stores: the k largest non-target teacher log-probs and the target's."""
    a = torch.log_softmax(teacher_logits.double(), -1).float()
    masked = a.scatter(-1, targets[:, None], float("-inf"))
    vals, ids = masked.topk(k, -1)
    return CachedTeacher(ids, vals, a.gather(-1, targets[:, None]).squeeze(-1))


def exact_masked_kl_float64(t_logits, s_logits, targets):
    """Independent reference written straight from docs/design.md §1, in float64 with explicit loops."""
    out = []
    for t, s, y in zip(t_logits.double(), s_logits.double(), targets.tolist()):
        keep = [v for v in range(t.numel()) if v != y]
        p = torch.softmax(t[keep], 0)
        q = torch.softmax(s[keep], 0)
        out.append(float((p * (p.log() - q.log())).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(N, V, generator=g) * 3
    student = teacher + torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    return teacher, student, targets


def test_log1mexp_matches_float64_at_both_ends():
    x = torch.tensor([-1e-9, -1e-7, -1e-3, -0.5, -math.log(2), -1.0, -20.0, -100.0])
    expected = torch.log(-torch.expm1(x.double()))
    torch.testing.assert_close(log1mexp(x).double(), expected, rtol=1e-6, atol=1e-30)


def test_live_matches_independent_float64_reference(logits):
    teacher, student, targets = logits
    torch.testing.assert_close(live_masked_kl(student, teacher, targets).double(),
                               exact_masked_kl_float64(teacher, student, targets), rtol=1e-5, atol=1e-6)


def test_tail_with_full_vocabulary_equals_live_value_and_gradient(logits):
    teacher, student, targets = logits
    cache = cache_from_logits(teacher, targets, k=V - 1)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    cached, live = cached_kl(s1, targets, cache, "tail"), live_masked_kl(s2, teacher, targets)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-6)
    cached.sum().backward()
    live.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 16, 48])
def test_tail_is_a_lower_bound_of_exact(logits, k):
    teacher, student, targets = logits
    d_k = cached_kl(student, targets, cache_from_logits(teacher, targets, k), "tail")
    d = live_masked_kl(student, teacher, targets)
    assert (d_k >= -1e-6).all()
    assert (d_k <= d + 1e-5).all()


@pytest.mark.parametrize("estimator", ["tail", "topk", "full_kl"])
@pytest.mark.parametrize("k", [1, 8, V - 1])
def test_zero_when_student_equals_teacher(logits, estimator, k):
    teacher, _, targets = logits
    d = cached_kl(teacher, targets, cache_from_logits(teacher, targets, k), estimator)
    assert d.abs().max() < 1e-5


def test_full_kl_with_full_vocabulary_is_the_ordinary_kl(logits):
    teacher, student, targets = logits
    d = cached_kl(student, targets, cache_from_logits(teacher, targets, V - 1), "full_kl")
    a, b = torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)
    torch.testing.assert_close(d, (a.exp() * (a - b)).sum(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("estimator", ["tail", "topk", "full_kl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_finite_when_target_is_nearly_certain(estimator, dtype):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(N, V, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    teacher.scatter_(-1, targets[:, None], 40.0)  # p_y rounds to 1: log p_y > -1e-7
    student = (teacher + 0.1 * torch.randn(N, V, generator=g)).to(dtype).requires_grad_(True)
    cache = cache_from_logits(teacher, targets, k=8)
    assert (cache.target_logprob > -1e-7).all()
    d = cached_kl(student, targets, cache, estimator)
    assert torch.isfinite(d).all()
    d.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_finite_when_topk_covers_almost_all_mass():
    g = torch.Generator().manual_seed(2)
    teacher = torch.full((N, V), -60.0)
    teacher[:, :5] = torch.randn(N, 5, generator=g)  # 5 tokens hold everything
    targets = torch.zeros(N, dtype=torch.long)
    student = torch.randn(N, V, generator=g).requires_grad_(True)
    d = cached_kl(student, targets, cache_from_logits(teacher, targets, k=4), "tail")
    assert torch.isfinite(d).all() and (d >= -1e-6).all()
    d.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_regularized_loss_normalizes_by_labelled_tokens_and_survives_empty(logits):
    teacher, student, targets = logits
    kl = live_masked_kl(student, teacher, targets)
    parts = regularized_loss(student, targets, kl, reg_weight=0.5)
    ce = torch.nn.functional.cross_entropy(student, targets)
    torch.testing.assert_close(parts.loss, ce + 0.5 * kl.mean())
    # Two halves with the full count add up to the full-batch loss: exact gradient accumulation.
    halves = sum(regularized_loss(student[s], targets[s], kl[s], 0.5, num_items=N).loss for s in (slice(0, 20), slice(20, N)))
    torch.testing.assert_close(halves, parts.loss)
    empty = regularized_loss(student[:0], targets[:0], kl[:0], 0.5)
    assert empty.loss.item() == 0.0


def test_binary_term_and_masked_kl_add_up_to_the_full_kl():
    """DKD's decomposition, checked in float64 on random distributions (one with q_y near 1): KL(p || q) by its
    definition equals binary_kl + (1 - p_y) * live_masked_kl, and decomposition_sums shares it out so."""
    from stages.student.loss import binary_kl, decomposition_sums, live_masked_kl

    gen = torch.Generator().manual_seed(3)
    za, zb = torch.randn(6, 11, generator=gen, dtype=torch.float64) * 2, torch.randn(6, 11, generator=gen, dtype=torch.float64) * 2
    targets = torch.tensor([0, 3, 10, 5, 5, 7])
    zb[1, 3] += 25.0  # the student all but certain of the target
    p, q = za.softmax(-1), zb.softmax(-1)
    full = (p * (p.log() - q.log())).sum(-1)
    a_y, log_q_y = p.log().gather(-1, targets[:, None])[:, 0], q.log().gather(-1, targets[:, None])[:, 0]
    b = binary_kl(log_q_y, a_y).double()
    by_definition = torch.tensor([bp * math.log(bp / bq) + (1 - bp) * math.log((1 - bp) / (1 - bq))
                                  for bp, bq in zip(a_y.exp().tolist(), log_q_y.exp().tolist())], dtype=torch.float64)
    torch.testing.assert_close(b, by_definition, rtol=1e-5, atol=1e-6)
    d = live_masked_kl(zb, za, targets).double()
    torch.testing.assert_close(b + (1 - a_y.exp()) * d, full, rtol=1e-5, atol=1e-6)
    sums = decomposition_sums(d, log_q_y, a_y, "masked_kl")
    torch.testing.assert_close(sums.double(), torch.stack([b.sum(), full.sum()]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decomposition_sums(full, log_q_y, a_y, "full_kl")[1].double(), full.sum(), rtol=1e-5, atol=1e-6)
    assert decomposition_sums(d, log_q_y, a_y, "") is None
