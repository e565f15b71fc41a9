"""docs/design.md §5 tests 1-3 through the real peft model, and every LoRA variant end to end."""
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from stages.student.adapters import (
    adapter_state,
    base_state,
    lora_config,
    make_student,
    save_adapter,
    save_initial_adapter,
)
from stages.student.collator import CacheCollator, pad_token_id
from stages.student.loss import CachedTeacher, cached_kl, live_masked_kl
from stages.student.loss_mixin import batch_loss
from stages.student.methods import check_variant, get_method
from stages.student.reader import load_cache_dataset, open_cache
from stages.student.settings import LoraSettings

VARIANTS = ["lora", "rslora", "dora", "pissa", "olora"]


def cache_batch(cache_dir, model_dir, rows: int = 8) -> dict:
    manifest = open_cache(cache_dir, model_dir, verify=False)
    dataset = load_cache_dataset(cache_dir, manifest)
    return CacheCollator(pad_token_id(model_dir), manifest.settings.k,
                         encoding=manifest.settings.encoding)([dataset[i] for i in range(rows)])


def student(model_dir, variant: str = "lora", seed: int = 0) -> PeftModel:
    torch.manual_seed(seed)
    return make_student(model_dir, LoraSettings(variant=variant, rank=4), torch.float32)


def randomize_lora_b(model: PeftModel, seed: int = 1, std: float = 0.05) -> None:
    """B != 0: the student differs from the teacher and every gradient is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def per_token(model: PeftModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor, CachedTeacher, torch.Tensor]:
    """(student logits [N, V], teacher logits [N, V] via disable_adapter, cached teacher, targets [N])."""
    mask = batch["labels"][:, 1:] != -100
    args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        student_logits = model(**args).logits[:, :-1][mask]
        with model.disable_adapter():
            teacher_logits = model(**args).logits[:, :-1][mask]
    cache = CachedTeacher(batch["teacher_topk_ids"], batch["teacher_topk_logprobs"], batch["teacher_target_logprob"])
    return student_logits, teacher_logits, cache, batch["labels"][:, 1:][mask]


def lora_grads(model: PeftModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


# --- docs/design.md §5 tests 1-3 ----------------------------------------------------------------------
def test_tail_with_full_vocabulary_equals_live_loss_and_lora_gradients(full_vocab_cache, tiny_model_dir):
    batch = cache_batch(full_vocab_cache, tiny_model_dir)
    model = student(tiny_model_dir)
    randomize_lora_b(model)
    cached, live, plain = (batch_loss(model, batch, get_method(e), reg_weight=1.0) for e in ("tail", "live", "none"))
    assert cached.regularizer > 1e-3  # the student really differs from the teacher
    torch.testing.assert_close(cached.regularizer, live.regularizer, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached.loss, live.loss, rtol=1e-5, atol=1e-6)
    g_cached, g_live, g_plain = (lora_grads(model, p.loss) for p in (cached, live, plain))
    kl_grad_norm = sum((g_cached[n] - g_plain[n]).norm() ** 2 for n in g_plain) ** 0.5
    assert kl_grad_norm > 1e-3  # the KL term moves every kind of LoRA weight, not a trivial zero
    assert all((g_cached[n] - g_plain[n]).abs().max() > 0 for n in g_plain if "lora_A" in n)
    for name in g_live:
        torch.testing.assert_close(g_cached[name], g_live[name], rtol=1e-5, atol=1e-5, msg=name)


def train_a_little(model: PeftModel, batch: dict, steps: int = 4, lr: float = 1e-2) -> None:
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        optim.zero_grad()
        batch_loss(model, batch, get_method("none"), reg_weight=0.0).loss.backward()
        optim.step()


@pytest.mark.parametrize("adapter", ["random", "trained"])
def test_tail_is_a_lower_bound_of_the_exact_masked_kl(tiny_cache, tiny_model_dir, adapter):
    batch = cache_batch(tiny_cache, tiny_model_dir)
    model = student(tiny_model_dir)
    randomize_lora_b(model) if adapter == "random" else train_a_little(model, batch)
    s, t, cache, y = per_token(model, batch)
    d_k, d = cached_kl(s, y, cache, "tail"), live_masked_kl(s, t, y)
    assert d.mean() > 1e-3
    assert (d_k >= -1e-6).all() and (d_k <= d + 1e-5).all()


@pytest.mark.parametrize("cache_name", ["tiny_cache", "full_vocab_cache"])
def test_tail_is_zero_at_lora_init(cache_name, request, tiny_model_dir):
    batch = cache_batch(request.getfixturevalue(cache_name), tiny_model_dir)
    s, _, cache, y = per_token(student(tiny_model_dir), batch)  # B = 0: student == teacher
    assert cached_kl(s, y, cache, "tail").abs().max() < 1e-5


# --- variants ------------------------------------------------------------------------------------
def test_variant_configs():
    assert lora_config(LoraSettings(variant="rslora")).use_rslora
    assert lora_config(LoraSettings(variant="dora")).use_dora
    assert lora_config(LoraSettings(variant="pissa")).init_lora_weights == "pissa_niter_4"
    assert lora_config(LoraSettings(variant="olora")).init_lora_weights == "olora"
    assert lora_config(LoraSettings(variant="lora")).init_lora_weights is True


@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_live_is_refused_where_disable_adapter_is_not_the_base(variant):
    with pytest.raises(ValueError, match=f"'live' cannot be used with lora variant '{variant}'"):
        check_variant(get_method("live"), variant)
    check_variant(get_method("tail"), variant)


@pytest.mark.filterwarnings("ignore:OLoRA changes the base weights")  # we convert it, see save_adapter
@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_and_saves_a_stock_adapter(variant, tiny_cache, tiny_model_dir, tmp_path):
    batch = cache_batch(tiny_cache, tiny_model_dir, rows=4)
    model = student(tiny_model_dir, variant)
    if variant in ("pissa", "olora"):
        save_initial_adapter(model, tmp_path / "init")
    base, adapter = base_state(model), adapter_state(model)
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        optim.zero_grad()
        parts = batch_loss(model, batch, get_method("tail"), reg_weight=1.0)
        assert torch.isfinite(parts.loss) and torch.isfinite(parts.regularizer)
        parts.loss.backward()
        optim.step()
    after = base_state(model)
    assert all(torch.equal(base[n], after[n]) for n in base)  # frozen (residual, for pissa/olora) base
    assert any(not torch.equal(adapter[n], p) for n, p in adapter_state(model).items())
    save_adapter(model, tmp_path / "adapter", tmp_path / "init" if variant in ("pissa", "olora") else None)
    # Stock peft on the ORIGINAL base weights reproduces the trained student.
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tmp_path / "adapter")
    x = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        expected, got = model(**x).logits, reloaded(**x).logits
    tol = 1e-6 if variant in ("lora", "rslora", "dora") else 2e-4  # W_res + BA vs W + delta: rounding
    torch.testing.assert_close(got, expected, rtol=0, atol=tol)
