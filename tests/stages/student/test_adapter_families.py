"""The adapter families beyond peft's LoRA: randlora (peft's RandLoRA) and sinelora (stages/student/sine_lora.py).

SineLoRA's layer against sin(omega * B A) / g * alpha / r written out by hand (float64); for lora, dora, randlora
and sinelora after one optimizer step (adapter != init): fused == unfused loss and gradients, disable_adapter() is
the base model, a saved adapter reloads exactly; a trained randlora/sinelora adapter exports to plain weights; the
refusals name the variant and the reason."""
import json
import math

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from stages.student.adapters import load_adapter, lora_config, make_student, randlora_basis_rank, save_adapter
from stages.student.export import export_merged
from stages.student.loss_mixin import batch_loss
from stages.student.methods import check_variant, get_method
from stages.student.settings import LoraSettings
from stages.student.sine_lora import SineLoraConfig, check_sine_layers

FAMILIES = ["lora", "dora", "randlora", "sinelora"]


# --- SineLoRA's layer, by hand ----------------------------------------------------------------------
class OneLinear(torch.nn.Module):
    def __init__(self, n_in: int = 12, n_out: int = 10):
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("scale", [0.0, 2.5])  # 0: g = sqrt(in_features)
def test_sine_layer_forward_delta_and_merge_equal_a_hand_computation(scale):
    torch.manual_seed(0)
    model = get_peft_model(OneLinear(), SineLoraConfig(r=3, lora_alpha=6.0, target_modules=["lin"], sine_frequency=7.0,
                                                       sine_scale=scale)).double()
    layer = model.base_model.model.lin
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 12, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(a)
        layer.lora_B["default"].weight.copy_(b)  # B != 0
    w, bias = layer.base_layer.weight.detach().clone(), layer.base_layer.bias.detach().clone()
    x = torch.randn(5, 12, generator=g, dtype=torch.float64)
    # delta W[i, j] = sin(7 * sum_k B[i, k] A[k, j]) / g * (alpha / r), element by element
    product = torch.stack([torch.stack([sum(b[i, k] * a[k, j] for k in range(3)) for j in range(12)]) for i in range(10)])
    delta = torch.sin(7.0 * product) / (scale or math.sqrt(12)) * (6.0 / 3)
    expected = x @ w.T + bias + x @ delta.T
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(layer.get_delta_weight("default"), delta, rtol=0, atol=1e-12)
        model.merge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, w + delta, rtol=0, atol=1e-12)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)  # merged: the base layer alone
        model.unmerge_adapter()
        torch.testing.assert_close(layer.base_layer.weight, w, rtol=0, atol=1e-12)
    assert (x @ delta.T).abs().max() > 0.1  # the adapter really contributes


def test_sine_layers_refuse_what_is_not_a_linear_layer():
    from transformers import GPT2Config, GPT2LMHeadModel  # GPT-2's projections are transformers' Conv1D

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    model = get_peft_model(gpt2, SineLoraConfig(r=2, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"sinelora adapts torch.nn.Linear layers only; .*c_attn \(Conv1D\)"):
        check_sine_layers(model)


# --- the four families through the student --------------------------------------------------------
def student(model_dir, variant: str, rank: int = 4):
    torch.manual_seed(0)
    return make_student(model_dir, LoraSettings(variant=variant, rank=rank), torch.float32)


@torch.no_grad()
def batch(model, k: int = 8) -> dict:
    """3 sequences of 16 (a prompt of 3 in the first, 4 padding positions in the last) and a cache from the base."""
    ids = torch.randint(4, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[0, :3] = -100
    with model.disable_adapter():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].double(), -1).float()
    mask = labels[:, 1:] != -100
    a, targets = logp[mask], labels[:, 1:][mask]
    vals, top = a.scatter(-1, targets[:, None], float("-inf")).topk(k, -1)
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "teacher_topk_ids": top,
            "teacher_topk_logprobs": vals, "teacher_target_logprob": a.gather(-1, targets[:, None])[:, 0]}


def step(model, inputs: dict, lr: float = 1e-2) -> None:
    """One AdamW step on the unfused tail loss: B (RandLoRA: lambda) leaves 0, so every adapter tensor has a gradient."""
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch_loss(model, inputs, get_method("tail"), reg_weight=0.5).loss.backward()
    optim.step()
    model.zero_grad(set_to_none=True)


def logits(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("variant", FAMILIES)
def test_after_a_step_fused_equals_unfused_the_base_is_intact_and_a_reload_is_exact(variant, tiny_model_dir, tmp_path):
    model = student(tiny_model_dir, variant)
    inputs = batch(model)
    step(model, inputs)
    results = []
    for fused in (False, True):
        parts = batch_loss(model, inputs, get_method("tail"), reg_weight=0.5, num_items=40, fused=fused, chunk_size=7)
        parts.loss.backward()
        results.append((parts, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        model.zero_grad(set_to_none=True)
    (ref, ref_grads), (got, got_grads) = results
    assert ref.regularizer > 1e-4  # the stepped student differs from the teacher
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.regularizer, ref.regularizer, rtol=1e-5, atol=1e-7)
    assert ref_grads and all(g.abs().sum() > 0 for g in ref_grads.values())  # A and B; RandLoRA's lambda and gamma
    for name, g in ref_grads.items():
        err = (got_grads[name] - g).abs().max() / g.abs().max()
        assert err <= 5e-6, f"{name}: relative error {err:.1e}"
    # disable_adapter() is the base model (so method `live` is allowed), and the adapter is not at its init
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)
    check_variant(get_method("live"), variant)
    assert (logits(model, inputs) - logits(base, inputs)).abs().max() > 1e-3
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(base, tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=1e-6)


def test_a_sinelora_adapter_keeps_omega_and_g_and_stock_peft_refuses_it(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    settings = LoraSettings(variant="sinelora", rank=4, sine_frequency=50.0, sine_scale=3.0)
    model = make_student(tiny_model_dir, settings, torch.float32)
    inputs = batch(model)
    step(model, inputs)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["sine_frequency"], saved["sine_scale"]) == ("SINELORA", 50.0, 3.0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    with pytest.raises(KeyError, match="SINELORA"):  # not silently a plain LoRA without the sine
        PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    reloaded = load_adapter(base, tmp_path / "adapter")
    q = reloaded.base_model.model.model.layers[0].self_attn.q_proj
    assert (q.sine_frequency["default"], q.sine_scale["default"]) == (50.0, 3.0)
    torch.testing.assert_close(logits(reloaded, inputs), logits(model, inputs), rtol=0, atol=1e-6)
    resumed = make_student(tiny_model_dir, settings, torch.float32)  # the Trainer's resume: weights into the live adapter
    resumed.load_adapter(str(tmp_path / "adapter"), "default", is_trainable=True)
    torch.testing.assert_close(logits(resumed, inputs), logits(model, inputs), rtol=0, atol=1e-6)
    assert lora_config(LoraSettings(variant="sinelora")).sine_frequency == 200.0  # 0 = the project's default


@pytest.mark.parametrize("variant", ["randlora", "sinelora"])
def test_export_merges_a_trained_adapter_into_plain_weights(variant, tiny_model_dir, tmp_path):
    model = student(tiny_model_dir, variant)
    inputs = batch(model)
    for _ in range(3):
        step(model, inputs, lr=1e-3)  # train.learning_rate's default; float32 merge rounding grows with the update
    save_adapter(model, tmp_path / "adapter")
    export_merged(tmp_path / "adapter", tiny_model_dir, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert all("lora" not in name for name, _ in merged.named_parameters())
    adapted, plain = logits(model, inputs), logits(merged, inputs)
    assert (adapted - logits(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(plain, adapted, rtol=0, atol=1e-5)


# --- RandLoRA's rank, and the refusals -------------------------------------------------------------
def test_randlora_basis_rank_is_the_smallest_within_the_lora_budget(tiny_model_dir):
    two_square = torch.nn.Sequential(torch.nn.Linear(4096, 4096), torch.nn.Linear(4096, 4096))
    # LoRA rank 8: 8 * (4096 + 4096) = 65536 per layer. r_b = 293: ceil(4096 / 293) = 14 bases, 14 * (293 + 4096)
    # = 61446 <= 65536; r_b = 292: 15 bases, 15 * 4388 = 65820 > 65536 (and every smaller r_b is larger still)
    assert randlora_basis_rank(two_square, LoraSettings(variant="randlora", rank=8, target_modules=["0", "1"])) == 293
    model = student(tiny_model_dir, "randlora")
    config = model.peft_config["default"]
    # tiny Llama, 14 layers of min(in, out) = 128, LoRA rank 4: 17408 numbers; r_b = 16: 8 bases, 14 * 8 * 144 = 16128
    assert (type(config).__name__, config.r, config.randlora_alpha / config.r) == ("RandLoraConfig", 16, 16.0 / 4)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 16128
    with pytest.raises(ValueError, match="randlora: its basis rank is solved from the model's layers"):
        lora_config(LoraSettings(variant="randlora"))


def test_sinelora_is_refused_on_a_4bit_base_with_the_reason(tiny_model_dir):
    with pytest.raises(ValueError, match="train.quantization=4bit: not with train.lora.variant=sinelora .*Linear4bit"):
        make_student(tiny_model_dir, LoraSettings(variant="sinelora"), torch.float32, quantization="4bit")


def test_randlora_trains_on_a_4bit_base(tiny_model_dir):
    bnb = pytest.importorskip("bitsandbytes", reason="the optional extra `quant` (pip install -e '.[quant]')")
    torch.manual_seed(0)
    model = make_student(tiny_model_dir, LoraSettings(variant="randlora", rank=4), torch.float32, quantization="4bit")
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer(), bnb.nn.Linear4bit)
    step(model, batch(model))
    assert any(p.abs().max() > 0 for n, p in model.named_parameters() if "randlora_lambda" in n)


@pytest.mark.parametrize("field, value", [("sine_frequency", -1.0), ("sine_scale", -0.5)])
def test_negative_sine_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=f"train.lora.{field}: must be >= 0"):
        LoraSettings(variant="sinelora", **{field: value})


def test_olora_on_conv1d_layers_is_refused_by_name(tmp_path):
    """peft's OLoRA init does not transpose GPT-2's [in, out] Conv1D weights: the first forward would fail on a
    shape mismatch; make_student names the layers and the way out instead."""
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"train.lora.variant=olora: not on Conv1D layers \(transformer.h.0.attn.c_attn, "
                                         r"transformer.h.0.attn.c_proj, transformer.h.0.mlp.c_fc \.\.\.: .*use pissa or lora"):
        make_student(tmp_path, LoraSettings(variant="olora", rank=2))
    make_student(tmp_path, LoraSettings(variant="pissa", rank=2))  # PiSSA's init handles them
