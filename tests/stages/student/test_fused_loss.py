"""The fused chunked loss against the unfused one: values and gradients (hidden, W, bias, LoRA weights)."""
import pytest
import torch

from stages.student.adapters import make_student
from stages.student.fused_loss import auto_chunk_size, chunked_regularized_loss
from stages.student.lm_head import output_head
from stages.student.loss import CachedTeacher, cached_kl, regularized_loss
from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method, methods
from stages.student.settings import LoraSettings
from stages.teacher.tail_draws import tail_draws

N, H, V, K = 37, 24, 50, 6
ESTIMATORS = ["tail", "topk", "full_kl", None]  # None: CE only


def cache_from_logits(teacher_logits: torch.Tensor, targets: torch.Tensor, k: int) -> CachedTeacher:
    a = torch.log_softmax(teacher_logits.double(), -1).float()
    vals, ids = a.scatter(-1, targets[:, None], float("-inf")).topk(k, -1)
    return CachedTeacher(ids, vals, a.gather(-1, targets[:, None]).squeeze(-1))


def problem(dtype, n=N, k=K, seed=0):
    """hidden [n, H], W [V, H], bias [V], targets, and a cache from a teacher near the student."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.6
    bias = torch.randn(V, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, (n,), generator=g)
    teacher_logits = hidden @ weight.T + bias + torch.randn(n, V, generator=g, dtype=torch.float64)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype), targets, cache_from_logits(teacher_logits, targets, k)


def assert_grad_close(got: torch.Tensor, ref: torch.Tensor, tol: float, name: str = "") -> None:
    """Largest error relative to the largest gradient entry (float32 rounding of sums over V differs by order)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, name
    err = (got.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]


def unfused(hidden, weight, bias, targets, teacher, estimator, reg_weight, num_items):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    kl = cached_kl(logits, targets, teacher, estimator) if estimator else None
    return regularized_loss(logits, targets, kl, reg_weight, num_items=num_items)


def fused(hidden, weight, bias, targets, teacher, estimator, reg_weight, num_items, chunk_size):
    return chunked_regularized_loss(hidden, weight, targets, teacher if estimator else None, reg_weight,
                                    estimator or "tail", num_items=num_items, chunk_size=chunk_size, lm_head_bias=bias)


def both(dtype, estimator, chunk_size, k=K, n=N, with_bias=False, scale=2.5):
    """(unfused parts, fused parts, unfused grads, fused grads) with backward of scale * loss."""
    hidden, weight, bias, targets, teacher = problem(dtype, n, k)
    bias = bias if with_bias else None
    out = []
    for fn, extra in ((unfused, {}), (fused, {"chunk_size": chunk_size})):
        h, w, b = leaves(hidden, weight, bias)
        parts = fn(h, w, b, targets, teacher, estimator, 0.7, n + 9, **extra)
        (scale * parts.loss).backward()
        out.append((parts, [t.grad for t in (h, w, b) if t is not None]))
    return out


# --- against the unfused loss --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("chunk_size", [1, 7, N, 64])
@pytest.mark.parametrize("k", [K, V - 1])
def test_value_and_gradients_equal_the_unfused_loss(dtype, estimator, chunk_size, k):
    (ref, ref_grads), (got, got_grads) = both(dtype, estimator, chunk_size, k=k)
    for name in ("loss", "ce", "regularizer", "penalty"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-6, atol=1e-7, msg=name)
    assert got.n_tokens == ref.n_tokens == N
    assert (ref.regularizer > 0) == (estimator is not None)
    for name, g_ref, g_got in zip(("hidden", "weight"), ref_grads, got_grads):
        assert g_got.dtype == dtype
        assert_grad_close(g_got, g_ref, 2e-6, name)  # seen: <= 7.2e-7 (float32 maths for both dtypes)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bias_gradient_and_a_frozen_weight(estimator):
    (_, ref_grads), (_, got_grads) = both(torch.float32, estimator, chunk_size=5, with_bias=True)
    for name, g_ref, g_got in zip(("hidden", "weight", "bias"), ref_grads, got_grads):
        assert_grad_close(g_got, g_ref, 2e-6, name)
    hidden, weight, _, targets, teacher = problem(torch.float32)
    h = hidden.clone().requires_grad_(True)
    fused(h, weight, None, targets, teacher, estimator, 1.0, None, 8).loss.backward()  # W frozen, as under LoRA
    assert weight.grad is None and h.grad is not None and h.grad.abs().sum() > 0


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_zero_rows_give_zero_loss_and_zero_gradients(estimator):
    (ref, ref_grads), (got, got_grads) = both(torch.float32, estimator, chunk_size=4, n=0)
    assert got.loss.item() == ref.loss.item() == 0.0 and got.ce.item() == 0.0 and got.regularizer.item() == 0.0
    assert got_grads[0].shape == (0, H) and torch.equal(got_grads[1], torch.zeros(V, H)) and torch.equal(ref_grads[1], got_grads[1])


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_peaked_logits_match_and_stay_finite(estimator):
    """Logits 40x wider: q_y rounds to 1 on many rows and the rest lies > 100 nats below the max."""
    hidden, weight, _, targets, _ = problem(torch.float32)
    weight = weight * 40
    logits = hidden @ weight.T
    targets = logits.argmax(-1)  # the student is (over)confident in the target
    teacher = cache_from_logits(logits.double() / 40, targets, K)
    assert (torch.log_softmax(logits, -1).gather(-1, targets[:, None]) > -1e-7).float().mean() > 0.3
    results = []
    for fn, extra in ((unfused, {}), (fused, {"chunk_size": 5})):
        h, w = leaves(hidden, weight)
        parts = fn(h, w, None, targets, teacher, estimator, 0.7, None, **extra)
        parts.loss.backward()
        results.append((parts, h.grad, w.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    assert torch.isfinite(got.loss) and all(torch.isfinite(g).all() for g in got_grads)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-5, atol=1e-6)
    for name, g_ref, g_got in zip(("hidden", "weight"), ref_grads, got_grads):
        # seen: <= 9.5e-6 apart; each is 1e-5..5e-5 from a float64 evaluation (fp32 logits of size ~250)
        assert_grad_close(g_got, g_ref, 3e-5, name)


@pytest.mark.parametrize("estimator", ["tail", "topk", "full_kl"])
def test_a_cache_that_repeats_an_id_or_holds_the_target_counts_it_once_like_unfused(estimator):
    hidden, weight, _, targets, teacher = problem(torch.float32)
    ids = teacher.topk_ids.clone()
    ids[::3, 1] = ids[::3, 0]          # a repeated id
    ids[1::3, 2] = targets[1::3]       # the target among the cached ids
    bad = CachedTeacher(ids, teacher.topk_logprobs, teacher.target_logprob)
    results = []
    for fn, extra in ((unfused, {}), (fused, {"chunk_size": 8})):
        h, w = leaves(hidden, weight)
        parts = fn(h, w, None, targets, bad, estimator, 0.7, None, **extra)
        parts.loss.backward()
        results.append((parts.loss, h.grad, w.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    for name, g_ref, g_got in zip(("hidden", "weight"), ref_grads, got_grads):
        assert_grad_close(g_got, g_ref, 2e-6, name)


def test_without_grad_mode_only_values_are_computed():
    hidden, weight, _, targets, teacher = problem(torch.float32)
    h, w = leaves(hidden, weight)
    ref = unfused(hidden, weight, None, targets, teacher, "tail", 0.7, None)
    with torch.no_grad():
        got = fused(h, w, None, targets, teacher, "tail", 0.7, None, 8)
    assert not got.loss.requires_grad
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bfloat16_weights_match_the_unfused_bfloat16_loss(estimator):
    """bf16 hidden and W: both paths make bf16 logits, upcast, and return bf16 gradients."""
    (ref, ref_grads), (got, got_grads) = both(torch.bfloat16, estimator, chunk_size=8)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-2, atol=1e-3)
    for name, g_ref, g_got in zip(("hidden", "weight"), ref_grads, got_grads):
        assert_grad_close(g_got, g_ref, 2e-2, name)


def test_autocast_computes_the_logits_in_the_autocast_dtype():
    hidden, weight, _, targets, teacher = problem(torch.float32)
    results = {}
    for name, fn, extra in (("unfused", unfused, {}), ("fused", fused, {"chunk_size": 8})):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[name] = fn(hidden, weight, None, targets, teacher, "tail", 0.7, None, **extra).loss
    exact = unfused(hidden, weight, None, targets, teacher, "tail", 0.7, None).loss
    torch.testing.assert_close(results["fused"], results["unfused"], rtol=1e-3, atol=1e-4)
    assert (results["fused"] - exact).abs() > 1e-4  # bf16 logits, not float32 ones


def test_bad_inputs_are_refused_with_the_field_named():
    hidden, weight, _, targets, teacher = problem(torch.float32)
    with pytest.raises(ValueError, match="lm_head_weight"):
        chunked_regularized_loss(hidden, weight[:, :5], targets, teacher, 1.0)
    with pytest.raises(ValueError, match="targets"):
        chunked_regularized_loss(hidden, weight, targets[:3], teacher, 1.0)
    with pytest.raises(ValueError, match="not a cache estimator"):
        chunked_regularized_loss(hidden, weight, targets, teacher, 1.0, estimator="live")
    with pytest.raises(ValueError, match="cached positions"):
        chunked_regularized_loss(hidden[:5], weight, targets[:5], teacher, 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_regularized_loss(hidden, weight, targets, teacher, 1.0, chunk_size=0)


def test_auto_chunk_size_bounds_one_float32_chunk():
    assert auto_chunk_size(151_936) == 1664 and 1664 * 151_936 <= 2**28
    assert auto_chunk_size(392) == 4096 and auto_chunk_size(10**7) == 256


# --- through a real peft LoRA model --------------------------------------------------------------
@pytest.fixture
def lora_student(tiny_model_dir):
    torch.manual_seed(0)
    model = make_student(tiny_model_dir, LoraSettings(rank=4))
    with torch.no_grad():  # B = 0 at init would make every lora_A gradient zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    return model


@torch.no_grad()
def lora_batch(model, k: int = 8) -> dict[str, torch.Tensor]:
    """3 sequences of 20: a prompt of 4 in the first, 5 padding positions in the last; base-model cache."""
    vocab = model.config.vocab_size
    ids = torch.randint(4, vocab, (3, 20), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[2, 15:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :4] = -100
    with model.disable_adapter():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].double(), -1).float()
    mask = labels[:, 1:] != -100
    a, targets = logp[mask], labels[:, 1:][mask]
    cache = cache_from_logits(a, targets, k)
    # The tail draws too (read by sampled_tail only): 6 per position, keyed by the position's index.
    draw_ids, entropy = tail_draws(a, targets, cache.topk_ids, torch.zeros_like(targets), torch.arange(len(targets)), 6, 0)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "teacher_topk_ids": cache.topk_ids,
            "teacher_topk_logprobs": cache.topk_logprobs, "teacher_target_logprob": cache.target_logprob,
            "teacher_draw_ids": draw_ids.long(), "teacher_tail_entropy": entropy}


@pytest.mark.parametrize("estimator", [m.name for m in methods() if m.supports_fused])  # every method fused covers
def test_lora_gradients_equal_the_unfused_step(lora_student, estimator):
    inputs = lora_batch(lora_student)
    results = []
    for fused_flag in (False, True):
        parts = batch_loss(lora_student, inputs, get_method(estimator), reg_weight=0.5, num_items=60, fused=fused_flag, chunk_size=7)
        parts.loss.backward()
        grads = {n: p.grad.clone() for n, p in lora_student.named_parameters() if p.requires_grad}
        lora_student.zero_grad(set_to_none=True)
        results.append((parts, grads))
    (ref, ref_grads), (got, got_grads) = results
    assert got.n_tokens == ref.n_tokens == 3 * 19 - 3 - 5  # labels[:, 1:]: 3 prompt, 5 padding
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.regularizer, ref.regularizer, rtol=1e-5, atol=1e-7)
    assert len(ref_grads) == 2 * 7 * 2 and all(g.abs().sum() > 0 for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert_grad_close(got_grads[name], g, 5e-6, name)  # seen: <= 1.7e-6


def test_heads_that_change_the_logits_are_refused(tiny_model_dir, lora_student):
    lora_student.get_base_model().config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_head(lora_student)
    wrapped_head = make_student(tiny_model_dir, LoraSettings(rank=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="not a plain"):
        output_head(wrapped_head)


def test_config_refuses_fused_live_and_a_negative_chunk():
    from stages.student.settings import TrainConfig

    with pytest.raises(ValueError, match="train.fused_loss: not supported with method 'live'"):
        TrainConfig(method="live", fused_loss=True)
    with pytest.raises(ValueError, match="train.fused_chunk_size"):
        TrainConfig(fused_loss=True, fused_chunk_size=-1)
    assert TrainConfig(method="lalora", fisher_data="x.jsonl", fused_loss=True).fused_loss


def test_autocast_inside_the_forward_only_is_followed(lora_student):
    """accelerate may wrap only model.forward in autocast: the fused logits must be bf16 there too."""
    inputs = lora_batch(lora_student)
    exact = batch_loss(lora_student, inputs, get_method("tail"), 0.5, fused=True, chunk_size=7).loss
    forward = lora_student.forward
    lora_student.forward = torch.autocast("cpu", dtype=torch.bfloat16)(forward)
    try:
        unfused_bf16 = batch_loss(lora_student, inputs, get_method("tail"), 0.5).loss
        fused_bf16 = batch_loss(lora_student, inputs, get_method("tail"), 0.5, fused=True, chunk_size=7).loss
    finally:
        lora_student.forward = forward
    torch.testing.assert_close(fused_bf16, unfused_bf16, rtol=2e-3, atol=1e-4)
    assert (fused_bf16 - exact).abs() > 1e-4  # bf16 logits, not float32 ones
