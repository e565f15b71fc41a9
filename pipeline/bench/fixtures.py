"""The bench's inputs, built on the fly: a random larger-vocabulary model and fixed-length text.

The random model borrows the demo model's tokenizer (its output layer is wider than the tokenizer:
allowed, docs/design.md §8), so it runs through the real stage one (tokenize -> engine -> shards).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.bench.models import build_random_llama

__all__ = ["build_large_vocab_model", "write_long_texts"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def build_large_vocab_model(out_dir: Path, tokenizer_from: str, shape) -> Path:
    """A random float32 Llama of `shape` (settings.LargeVocabShape) with `tokenizer_from`'s tokenizer."""
    hidden = shape.hidden_size
    build_random_llama(out_dir, vocab_size=shape.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads)
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_from) / name).exists():
            shutil.copy(Path(tokenizer_from) / name, out_dir / name)
    return out_dir


def write_long_texts(source_jsonl: str, out_path: Path, count: int, min_chars: int) -> Path:
    """`count` texts of at least `min_chars` characters, each a join of consecutive source texts, so
    that with data.max_length=L every sequence is truncated to exactly L tokens."""
    texts = [json.loads(line)["text"] for line in Path(source_jsonl).read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{source_jsonl}: no texts")
    out, cursor = [], 0
    while len(out) < count:
        parts = []
        while sum(len(p) for p in parts) < min_chars:
            parts.append(texts[cursor % len(texts)])
            cursor += 1
        out.append(json.dumps({"text": "\n\n".join(parts)}))
    out_path.write_text("\n".join(out) + "\n")
    return out_path
