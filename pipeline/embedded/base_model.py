"""Run: python -m pipeline build-default   (builds the whole embedded default; see build.py)

The embedded default's base model: a tiny Llama (or, `build-default --backbone qwen2`, a Qwen2) pretrained
on the source (prose) corpus only.

Pretraining runs a fixed number of AdamW steps on packed sequences with seeded init, seeded batch
order and deterministic kernels, so the same recipe on the same machine gives bit-identical
weights. The model never sees the target (code) corpus; its loss there stays high, which is the
gap fine-tuning closes and the source loss it must not give up.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import (GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM, get_cosine_schedule_with_warmup)

from pipeline.embedded.recipe import DefaultRecipe

__all__ = ["model_config", "pack", "eval_loss", "pretrain", "build_base_model"]


_FAMILY = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def model_config(recipe: DefaultRecipe, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The recipe's shape in its family's config class, sized to the tokenizer, float32."""
    config_class, _ = _FAMILY[recipe.family]
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.n_layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads or recipe.heads,
        max_position_embeddings=recipe.max_positions,
        tie_word_embeddings=recipe.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
        attn_implementation="sdpa",
    )


def pack(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Concatenate `<s> text </s>` for every text and cut into rows of seq_len (tail dropped).

    Returns int64 [n_rows, seq_len]. Rows cross document boundaries, as in GPT pretraining.
    """
    ids: list[int] = []
    for encoded in tokenizer(list(texts), verbose=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_rows = len(ids) // seq_len
    if n_rows == 0:
        raise ValueError(f"{len(ids)} tokens do not fill one sequence of {seq_len}")
    return torch.tensor(ids[:n_rows * seq_len], dtype=torch.long).view(n_rows, seq_len)


@torch.no_grad()
def eval_loss(model: PreTrainedModel, rows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over every predicted token of `rows` [n, seq_len]."""
    model.eval()
    total = 0.0
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        # Every row has the same length, so weighting by row count gives the token mean.
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    return total / len(rows)


def _batch_order(n_rows: int, batch_size: int, steps: int, seed: int) -> Iterator[torch.Tensor]:
    """Row indices for each step: seeded permutations, one per epoch, read in order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n_rows, generator=gen)])
        yield order[:batch_size]
        order = order[batch_size:]


@contextlib.contextmanager
def _deterministic():
    """Deterministic kernels for the duration, restoring the caller's setting afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def pretrain(model: PreTrainedModel, rows: torch.Tensor, recipe: DefaultRecipe,
             progress: bool = True) -> list[float]:
    """AdamW with warmup + cosine decay for recipe.steps steps; returns the loss of every step."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]  # norms: decaying them only hurts
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.lr, betas=(0.9, 0.95))
    schedule = get_cosine_schedule_with_warmup(optimizer, recipe.warmup_steps, recipe.steps)
    model.train()
    losses = []
    bar = tqdm(_batch_order(len(rows), recipe.batch_size, recipe.steps, recipe.seed),
               total=recipe.steps, desc="pretrain base model", disable=not progress)
    for index in bar:
        batch = rows[index]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def build_base_model(recipe: DefaultRecipe, tokenizer: PreTrainedTokenizerBase,
                     texts: dict[str, list[str]], out_dir: str | Path,
                     progress: bool = True) -> dict:
    """Pretrain on texts["source_train"], evaluate, save model + tokenizer into out_dir.

    texts: {"source_train", "source_heldout", "target_heldout"} -> list of texts.
    Returns the figures for build_info.json.
    """
    rows = pack(tokenizer, texts["source_train"], recipe.seq_len)
    heldout = {name: pack(tokenizer, texts[name], recipe.seq_len)
               for name in ("source_heldout", "target_heldout")}
    with _deterministic(), torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model = _FAMILY[recipe.family][1](model_config(recipe, tokenizer))
        losses = pretrain(model, rows, recipe, progress)
    info = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens_seen": recipe.steps * recipe.batch_size * recipe.seq_len,
        "source_train_rows": len(rows),
        "epochs": round(recipe.steps * recipe.batch_size / len(rows), 2),
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_loss_every_25_steps": [round(x, 4) for x in losses[::25]],
        "chance_loss": math.log(len(tokenizer)),
    }
    info.update({f"{name}_loss": eval_loss(model, r) for name, r in heldout.items()})
    _save(model, tokenizer, out_dir)
    return info


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_length=model.config.max_position_embeddings)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
