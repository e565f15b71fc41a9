"""Run: python -c "from pipeline.embedded.recipe import DefaultRecipe; print(DefaultRecipe())"

The recipe of the embedded default: every number that decides the corpora, the tokenizer and the
base model. A build is identified by `recipe_hash(recipe)`; change a field and it rebuilds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.embedded.corpora import CorpusCaps

__all__ = ["DefaultRecipe", "BACKBONES", "backbone_recipe", "recipe_hash", "recipe_dict"]

# The modules whose code decides the build; editing any of them invalidates old builds.
_EMBEDDED_DIR = Path(__file__).resolve().parent
_SOURCE_FILES = ("corpora.py", "tokenizer.py", "base_model.py", "recipe.py", "build.py")


FAMILIES = ("llama", "qwen2")


@dataclass(frozen=True)
class DefaultRecipe:
    """How to build the default corpora, tokenizer and base model.

    corpus: length filters, size caps and split seed of the two corpora (see CorpusCaps).
    stdlib_dir: tree the corpora are mined from; "" means this Python's stdlib. Tests point it at
        a small copy so a build takes seconds.
    max_example_tokens: drop examples longer than this many tokens (with <s> and </s>) so every
        one fits the model's context, prompt template included.
    vocab_size: BPE vocabulary size, the 4 special tokens included.
    family: "llama" (LlamaForCausalLM, the default) or "qwen2" (Qwen2ForCausalLM: biased q/k/v, grouped KV).
    n_layers, hidden, heads, intermediate: the shape; hidden // heads must be 64, the smallest
        head size vLLM's CPU attention accepts.
    kv_heads: key/value heads (grouped-query attention); 0 means `heads`.
    tie_embeddings: share the input embedding and the output head.
    max_positions: max_position_embeddings, the model's context length.
    seq_len: length of the packed pretraining sequences.
    batch_size: sequences per optimizer step.
    steps: optimizer steps; fixed (not a time budget) so the weights are reproducible.
    lr, warmup_steps, weight_decay, grad_clip: AdamW with linear warmup then cosine decay to 0.
    seed: seeds the weight init and the batch order.
    """
    corpus: CorpusCaps = field(default_factory=CorpusCaps)
    stdlib_dir: str = ""
    max_example_tokens: int = 480
    vocab_size: int = 2048
    family: str = "llama"
    n_layers: int = 4
    hidden: int = 128
    heads: int = 2
    intermediate: int = 512
    kv_heads: int = 0
    tie_embeddings: bool = False
    max_positions: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 450
    lr: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: expected one of {FAMILIES}")
        if self.kv_heads < 0 or self.kv_heads and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads must divide heads ({self.heads}), got {self.kv_heads}")
        if self.hidden % self.heads or self.hidden // self.heads != 64:
            raise ValueError(f"hidden / heads must be 64 (vLLM CPU attention), got {self.hidden}/{self.heads}")
        if not 0 < self.seq_len <= self.max_positions:
            raise ValueError(f"need 0 < seq_len <= max_positions, got {self.seq_len}, {self.max_positions}")
        if not 0 < self.max_example_tokens <= self.max_positions:
            raise ValueError(f"need 0 < max_example_tokens <= max_positions, got {self.max_example_tokens}")
        if min(self.steps, self.batch_size, self.n_layers, self.intermediate) < 1:
            raise ValueError("steps, batch_size, n_layers and intermediate must be >= 1")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"need 0 <= warmup_steps < steps, got {self.warmup_steps}, {self.steps}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


# `build-default --backbone NAME`: the default, and a second backbone of another family and ~2.3x the parameters
# (Qwen2-shaped: tied embeddings, grouped KV heads, head size 64), pretrained by the same recipe on the same prose.
BACKBONES = {
    "llama": DefaultRecipe(),
    "qwen2": DefaultRecipe(family="qwen2", n_layers=6, hidden=192, heads=3, kv_heads=1, intermediate=768,
                           tie_embeddings=True),
}


def backbone_recipe(name: str) -> DefaultRecipe:
    """The recipe of a named backbone (`BACKBONES`); ValueError naming the choices."""
    if name not in BACKBONES:
        raise ValueError(f"backbone {name!r}: expected one of {sorted(BACKBONES)}")
    return BACKBONES[name]


def recipe_dict(recipe: DefaultRecipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_hash(recipe: DefaultRecipe) -> str:
    """sha256 over the recipe, the Python version (it fixes the stdlib corpora), the library
    versions that decide the weights, and the source of the embedded modules."""
    import tokenizers
    import torch
    import transformers

    h = hashlib.sha256()
    h.update(json.dumps(recipe_dict(recipe), sort_keys=True).encode())
    versions = [sys.version, torch.__version__, transformers.__version__, tokenizers.__version__]
    h.update("\n".join(versions).encode())
    for name in _SOURCE_FILES:
        h.update((_EMBEDDED_DIR / name).read_bytes())
    return h.hexdigest()
