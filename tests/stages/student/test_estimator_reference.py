"""tail, topk and full_kl against an independent float64 reference (tests/reference_kl.py), at k < |V| - 1.

The reference is written from docs/design.md §1-§4, not from stages/student/loss.py; the fused and
unfused paths are each compared with it (not with each other: they share `kl_from_stats`). Values and
gradients; random logits with a large tail mass and peaked ones with a tiny tail mass; the tiny real
model through a real peft LoRA model, both `batch_loss` paths; and `train.k` truncation of a real cache.

Tolerances. The code computes every estimator in float32 (design doc §5: "All estimators return one
float32 value per position"), whatever the input dtype, so float64 agreement is not on offer. A
per-position value is a sum of at most k + 2 terms, each a difference of float32 log-sum-exps over
<= 512 logits of size <= ~30: each carries an absolute rounding of a few 1e-7 nats (eps 1.2e-7 times
the logits' size, amplified at most ~10x by the sums). Hence values: atol 5e-6 + rtol 1e-5 per
position; gradients: max error over entries <= 1e-5 of the largest entry. Measured on the random
logits: values <= 1.4e-6 apart, gradients <= 1.2e-6. A wrong formula moves values by 1e-3 to 1 here.
"""
from __future__ import annotations

import pytest
import torch
from reference_kl import reference_kl, reference_loss

from stages.student.adapters import make_student
from stages.student.collator import CacheCollator, pad_token_id
from stages.student.fused_loss import chunked_regularized_loss
from stages.student.loss import CachedTeacher, cached_kl, regularized_loss
from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method
from stages.student.reader import load_cache_dataset, open_cache
from stages.student.settings import LoraSettings

METHODS = ("tail", "topk", "full_kl")
N, V, H = 24, 64, 16
KS = (1, 4, 24, V - 1)          # k = 1, small, mid, and |V| - 1 (no tail)
VALUE_ATOL, VALUE_RTOL, GRAD_TOL = 5e-6, 1e-5, 1e-5
LAMBDA = 0.7


def teacher_cache(teacher_logits: torch.Tensor, targets: torch.Tensor, k: int) -> CachedTeacher:
    """Stage one done independently: float64 log-softmax, the k largest non-target entries, stored as float32."""
    a = torch.log_softmax(teacher_logits.double(), -1)
    order = a.scatter(-1, targets[:, None], float("-inf")).argsort(-1, descending=True)[:, :k]
    return CachedTeacher(order, a.gather(-1, order).float(), a.gather(-1, targets[:, None]).squeeze(-1).float())


def teacher_tail_mass(cache: CachedTeacher) -> torch.Tensor:
    """R_T per position, in float64 from the cached values (design doc §3)."""
    p_S, p_y = cache.topk_logprobs.double().exp(), cache.target_logprob.double().exp()
    return 1 - p_S.sum(-1) / (1 - p_y)


def assert_values_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (got.double() - ref).abs()
    allowed = VALUE_ATOL + VALUE_RTOL * ref.abs()
    assert (err <= allowed).all(), f"{what}: worst error {err.max().item():.2e} (reference {ref[err.argmax()].item():.4g})"


def assert_grad_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    scale = ref.double().abs().max().item()
    err = (got.double() - ref.double()).abs().max().item() / max(scale, 1e-30)
    assert err <= GRAD_TOL, f"{what}: gradient error {err:.2e} of the largest entry {scale:.3g}"


# --- random logits: flat (large tail) and peaked (tiny tail) -------------------------------------
REGIMES = {"flat": 0.5, "peaked": 3.0}


def random_problem(regime: str, seed: int = 0):
    """hidden [N, H], W [V, H] float64, targets [N], teacher logits [N, V] near the student's."""
    g = torch.Generator().manual_seed(seed)
    scale = REGIMES[regime]
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * scale / H ** 0.5 * 2
    student = hidden @ weight.T
    teacher = student + scale * 0.3 * torch.randn(N, V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, targets, teacher


def test_the_regimes_have_the_tail_mass_they_claim():
    """flat: most non-target mass lies outside S at k = 4; peaked: almost none does at k = 24."""
    *_, targets, teacher = random_problem("flat")
    assert teacher_tail_mass(teacher_cache(teacher, targets, 4)).median() > 0.7
    *_, targets, teacher = random_problem("peaked")
    tail = teacher_tail_mass(teacher_cache(teacher, targets, 24))
    assert tail.median() < 1e-3 and tail.min() > 0  # tiny, yet a real bucket


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("method", METHODS)
def test_unfused_loss_matches_the_reference(method, k, regime):
    """cached_kl per position, regularized_loss's loss and KL mean, and d loss / d logits."""
    hidden, weight, targets, teacher_logits = random_problem(regime)
    cache = teacher_cache(teacher_logits, targets, k)
    logits64 = (hidden @ weight.T).requires_grad_(True)
    ref_kl = reference_kl(logits64, targets, cache.topk_ids, cache.topk_logprobs, cache.target_logprob, method)
    ref_loss, _, ref_kl_mean = reference_loss(logits64, targets, cache.topk_ids, cache.topk_logprobs, cache.target_logprob,
                                              method, LAMBDA, num_items=N + 5)
    (ref_grad,) = torch.autograd.grad(ref_loss, logits64)

    logits = logits64.detach().float().requires_grad_(True)
    kl = cached_kl(logits, targets, cache, method)
    parts = regularized_loss(logits, targets, kl, LAMBDA, num_items=N + 5)
    parts.loss.backward()
    assert_values_close(kl, ref_kl.detach(), f"{method} k={k} per position")
    assert_values_close(parts.regularizer, ref_kl_mean.detach(), "kl mean")
    assert_values_close(parts.loss, ref_loss.detach(), "loss")
    assert_grad_close(logits.grad, ref_grad, "d loss / d logits")


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_loss_matches_the_reference(method, k, regime):
    """chunked_regularized_loss on float64 hidden / W (chunks of 5 rows): loss, KL mean, d/d hidden, d/dW."""
    hidden, weight, targets, teacher_logits = random_problem(regime)
    cache = teacher_cache(teacher_logits, targets, k)
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    ref_loss, _, ref_kl_mean = reference_loss(h @ w.T, targets, cache.topk_ids, cache.topk_logprobs, cache.target_logprob,
                                              method, LAMBDA, num_items=N + 5)
    ref_grads = torch.autograd.grad(ref_loss, (h, w))

    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    parts = chunked_regularized_loss(h, w, targets, cache, LAMBDA, method, num_items=N + 5, chunk_size=5)
    parts.loss.backward()
    assert_values_close(parts.regularizer, ref_kl_mean.detach(), f"{method} k={k} kl mean")
    assert_values_close(parts.loss, ref_loss.detach(), "loss")
    assert_grad_close(h.grad, ref_grads[0], "d loss / d hidden")
    assert_grad_close(w.grad, ref_grads[1], "d loss / d W")


@pytest.mark.parametrize("method", METHODS)
def test_a_wrong_teacher_moves_every_estimator_off_the_reference(method):
    """The comparison can fail: the same student against a cache of another teacher differs by >> tolerance."""
    hidden, weight, targets, teacher_logits = random_problem("flat")
    logits = hidden @ weight.T
    cache = teacher_cache(teacher_logits, targets, 4)
    other = CachedTeacher(cache.topk_ids, cache.topk_logprobs - torch.tensor([0.1, 0, 0, 0]), cache.target_logprob)
    ref = reference_kl(logits, targets, cache.topk_ids, cache.topk_logprobs, cache.target_logprob, method)
    got = cached_kl(logits.float(), targets, other, method).double()
    assert (got - ref).abs().max() > 100 * VALUE_ATOL


# --- the tiny real model through peft LoRA: batch_loss, unfused and fused ------------------------
def lora_student(model_dir, sharpen: float = 1.0):
    """A LoRA student of the tiny Llama with B != 0 (at init B = 0 makes every lora_A gradient zero);
    `sharpen` scales its lm_head (frozen, shared by teacher and student) for a peaked model."""
    torch.manual_seed(0)
    model = make_student(model_dir, LoraSettings(rank=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
        model.get_base_model().lm_head.weight.mul_(sharpen)
    return model


@pytest.fixture(scope="module", params=["as_built", "sharpened"])
def lora_model(request, tiny_model_dir):
    """`as_built`: the tiny model (random weights, lm_head x8): flat, large tails; `sharpened`: lm_head x4
    more, so a confident top-1 (0.64 at the median) and tiny tails (3e-5 at k = 60), as a trained model has."""
    return lora_student(tiny_model_dir, 4.0 if request.param == "sharpened" else 1.0)


@pytest.fixture(scope="module")
def plain_lora_model(tiny_model_dir):
    return lora_student(tiny_model_dir)


def labelled_batch(model, k: int, seed: int = 1) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """3 sequences of 20 (a prompt of 4 in the first, 5 padding in the last) with the base model's cache
    built independently (teacher_cache); also returns the teacher's full log-probs at the labelled rows."""
    ids = torch.randint(4, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(seed))
    attention = torch.ones_like(ids)
    attention[2, 15:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :4] = -100
    mask = labels[:, 1:] != -100
    with torch.no_grad(), model.disable_adapter():
        teacher_logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1][mask]
    targets = labels[:, 1:][mask]
    cache = teacher_cache(teacher_logits, targets, k)
    batch = {"input_ids": ids, "attention_mask": attention, "labels": labels, "teacher_topk_ids": cache.topk_ids,
             "teacher_topk_logprobs": cache.topk_logprobs, "teacher_target_logprob": cache.target_logprob}
    return batch, torch.log_softmax(teacher_logits.double(), -1)


def reference_lora_grads(model, batch, method: str, num_items: int):
    """The reference loss of the model's own float32 logits (upcast to float64) and its LoRA gradients."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["labels"][:, 1:] != -100
    loss, _, kl_mean = reference_loss(logits[:, :-1][mask].double(), batch["labels"][:, 1:][mask], batch["teacher_topk_ids"],
                                      batch["teacher_topk_logprobs"], batch["teacher_target_logprob"], method, LAMBDA, num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), kl_mean.detach(), grads


@pytest.mark.parametrize("k", [1, 5, 60, -1], ids=["k1", "k5", "k60", "kV-1"])
@pytest.mark.parametrize("method", METHODS)
def test_lora_batch_loss_matches_the_reference(lora_model, method, k):
    """batch_loss, unfused and fused, on the tiny model: loss, KL mean and every LoRA gradient (-1: k = |V| - 1)."""
    k = k if k > 0 else lora_model.config.vocab_size - 1
    batch, _ = labelled_batch(lora_model, k)
    ref_loss, ref_kl, ref_grads = reference_lora_grads(lora_model, batch, method, num_items=60)
    assert len(ref_grads) == 28 and all(g.abs().sum() > 0 for g in ref_grads.values())
    for fused in (False, True):
        parts = batch_loss(lora_model, batch, get_method(method), LAMBDA, num_items=60, fused=fused, chunk_size=7)
        parts.loss.backward()
        got = {n: p.grad.clone() for n, p in lora_model.named_parameters() if p.requires_grad}
        lora_model.zero_grad(set_to_none=True)
        assert_values_close(parts.regularizer, ref_kl, f"{method} k={k} fused={fused} kl mean")
        assert_values_close(parts.loss, ref_loss, "loss")
        for name, g in ref_grads.items():
            assert_grad_close(got[name], g, f"{name} fused={fused}")


def test_the_models_have_the_tails_they_claim(lora_model, request):
    """What the fixture's parameters claim, at k = 60."""
    batch, logp = labelled_batch(lora_model, 60)
    top1 = logp.exp().amax(-1)
    tail = teacher_tail_mass(CachedTeacher(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"],
                                           batch["teacher_target_logprob"]))
    if request.node.callspec.params["lora_model"] == "sharpened":
        assert top1.median() > 0.5 and tail.median() < 1e-3 and tail.min() > 0
    else:
        assert top1.median() < 0.2 and tail.median() > 1e-1


# --- train.k: the first k of a larger real cache -------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("use_k", [1, 3])
def test_train_k_truncation_of_a_real_cache_matches_the_reference(tiny_cache, tiny_model_dir, plain_lora_model, method, use_k):
    """The k = 8 cache read back and cut to `use_k` by CacheCollator gives the loss of the teacher's own
    top-`use_k` (found here from a float64 base forward), through both paths."""
    lora_model = plain_lora_model
    manifest = open_cache(tiny_cache, tiny_model_dir, verify=False)
    rows = [load_cache_dataset(tiny_cache, manifest)[i] for i in range(4)]
    batch = CacheCollator(pad_token_id(tiny_model_dir), manifest.settings.k, encoding=manifest.settings.encoding,
                          use_k=use_k)(rows)
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad(), lora_model.disable_adapter():
        teacher_logits = lora_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    expected = teacher_cache(teacher_logits, batch["labels"][:, 1:][mask], use_k)
    assert batch["teacher_topk_ids"].shape == (int(mask.sum()), use_k)
    assert torch.equal(batch["teacher_topk_ids"].sort(-1).values, expected.topk_ids.sort(-1).values)
    reference_batch = {**batch, "teacher_topk_ids": expected.topk_ids, "teacher_topk_logprobs": expected.topk_logprobs,
                       "teacher_target_logprob": expected.target_logprob}
    n = int(mask.sum())
    ref_loss, ref_kl, ref_grads = reference_lora_grads(lora_model, reference_batch, method, num_items=n)
    for fused in (False, True):
        parts = batch_loss(lora_model, batch, get_method(method), LAMBDA, num_items=n, fused=fused, chunk_size=16)
        parts.loss.backward()
        got = {name: p.grad.clone() for name, p in lora_model.named_parameters() if p.requires_grad}
        lora_model.zero_grad(set_to_none=True)
        assert_values_close(parts.regularizer, ref_kl, f"{method} use_k={use_k} fused={fused} kl mean")
        assert_values_close(parts.loss, ref_loss, "loss")
        for name, g in ref_grads.items():
            assert_grad_close(got[name], g, name)
