"""Chunked eval (the default): loss, accuracy and drift from the last hidden state in row chunks equal
the full-logits path within float32 rounding, on a text and a chat set; the model is called without
full logits; a head that cannot be split falls back to full logits, saying so once."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.eval.evaluate as evaluate
from pipeline.config import load_config
from stages.eval.evaluate import eval_chunk_rows, score_texts


def adapted_model(model_dir):
    """The tiny model under a LoRA adapter whose B is random (so the adapted model differs from the base)."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.2)
    return model.eval()


def eval_batches(model_dir, data_path, max_length=32):
    config = load_config(None, [f"model={model_dir}", f"eval.max_length={max_length}", "eval.max_examples=12", "eval.batch_size=5"])
    return evaluate.eval_batches(str(data_path), AutoTokenizer.from_pretrained(model_dir), config.data, config.eval)[0]


def lm_head_positions(model):
    """Records how many positions each lm_head call projects."""
    seen: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: seen.append(out.shape[-2]))
    return seen


def assert_same(chunked, full):
    assert chunked["tokens"] == full["tokens"] > 0
    assert chunked["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert chunked["accuracy"] == pytest.approx(full["accuracy"], rel=1e-6)
    if "drift_kl" in full:
        assert full["drift_kl"] > 1e-3
        assert chunked["drift_kl"] == pytest.approx(full["drift_kl"], rel=1e-6)


@pytest.mark.parametrize("which", ["text", "chat"])
def test_chunked_equals_full_logits(which, request):
    model_dir, data, max_length = {"text": ("tiny_model_dir", "tiny_jsonl", 32),
                                   "chat": ("tool_chat_model_dir", "tool_chat_jsonl", 256)}[which]
    model_dir, data = request.getfixturevalue(model_dir), request.getfixturevalue(data)
    batches = eval_batches(model_dir, data, max_length)
    model = adapted_model(model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    seen = lm_head_positions(model)
    full = score_texts(model, batches, with_drift=True, chunked=False)
    assert seen and all(n > 0 for n in seen)
    seen.clear()
    for rows in (7, eval_chunk_rows(vocab)):  # several chunks per batch; one chunk (the 256 MiB default)
        chunked = score_texts(model, batches, with_drift=True, chunk_bytes=3 * 4 * vocab * rows)
        assert_same(chunked, full)
    assert len(seen) == 2 * 2 * len(batches) and set(seen) == {0}  # adapted + base per batch: no logits projected
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # no adapter, no drift
    assert_same(score_texts(base, batches, chunk_bytes=3 * 4 * vocab * 5), score_texts(base, batches, chunked=False))


def test_a_head_that_cannot_be_split_falls_back_saying_so_once(tiny_model_dir, tiny_jsonl, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "_said", set())
    batches = eval_batches(tiny_model_dir, tiny_jsonl)
    model = adapted_model(tiny_model_dir)
    reference = score_texts(model, batches, with_drift=True, chunked=False)
    model.get_base_model().config.logit_scale = 0.5  # Cohere-style scaling: not modelled by the chunked path
    seen = lm_head_positions(model)
    for _ in range(2):
        assert_same(score_texts(model, batches, with_drift=True), reference)
    assert seen and all(n > 0 for n in seen)
    out = capsys.readouterr().out
    assert out.count("eval: scoring from full [B, T, V] logits (unchunked)") == 1 and "logit_scale=0.5" in out
    assert "train.fused_loss" not in out


def test_chunk_rows_from_the_byte_budget():
    assert eval_chunk_rows(151_936) == 147 and 3 * 4 * 151_936 * 147 <= 256 * 2**20
    assert eval_chunk_rows(2_048) == 10_922
    assert eval_chunk_rows(10**12) == 1
    assert load_config(None, []).eval.chunked is True
    assert load_config(None, ["eval.chunked=false"]).eval.chunked is False
