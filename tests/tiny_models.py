"""Builders for the tests' tiny real models: a trained byte-level BPE tokenizer and a random Llama
(2 layers, head_dim 64: vLLM's CPU attention rejects 16). Imported by conftest fixtures and tests."""
from __future__ import annotations

from pathlib import Path

TINY_VOCAB = 512
SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Return the number of items in a container.",
    "def add(a, b):\n    return a + b",
    "Lists are mutable sequences, typically used to store collections of homogeneous items.",
    "for i in range(10):\n    print(i * i)",
] * 40


def build_tokenizer(out_dir: Path, vocab_size: int = TINY_VOCAB):
    """A byte-level BPE trained on SAMPLE_TEXTS, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SAMPLE_TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_llama(out_dir: Path, vocab_size: int, seed: int = 0, layers: int = 2) -> Path:
    """Random-weight LlamaForCausalLM, float32, saved with safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform outputs; widen the logits so top-k sets and tails are non-trivial.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
