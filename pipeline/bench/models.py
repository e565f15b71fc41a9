"""The one builder of random-weight models for benchmarks, studies and tests (no download, no tokenizer).

    from pipeline.bench.models import build_random_llama
    build_random_llama(Path("runs/m"), vocab_size=32000, hidden_size=256, num_hidden_layers=4)
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["build_random_llama"]


def build_random_llama(out_dir: Path, *, vocab_size: int, hidden_size: int = 128, num_hidden_layers: int = 2,
                       intermediate_size: int | None = None, num_attention_heads: int | None = None,
                       max_position_embeddings: int = 512, lm_head_scale: float = 8.0, seed: int = 0,
                       **config) -> Path:
    """A random-weight float32 LlamaForCausalLM saved (safetensors) to `out_dir`; returns `out_dir`.

    head_dim is 64 (vLLM's CPU attention rejects smaller), so heads default to hidden_size // 64 and
    intermediate_size to 2 * hidden_size. `lm_head_scale` widens the logits (random init gives
    near-uniform outputs; 8 makes top-k sets and tails non-trivial; 1 keeps the init). Extra keyword
    arguments go to LlamaConfig (e.g. bos_token_id). Deterministic in `seed`."""
    heads = num_attention_heads or hidden_size // 64
    torch.manual_seed(seed)
    llama = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                        intermediate_size=intermediate_size or 2 * hidden_size, num_attention_heads=heads,
                        num_key_value_heads=heads, head_dim=64, max_position_embeddings=max_position_embeddings,
                        tie_word_embeddings=config.pop("tie_word_embeddings", False), **config)
    model = LlamaForCausalLM(llama)
    if lm_head_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(lm_head_scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
