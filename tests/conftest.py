"""Session fixtures: a tiny real Llama (2 layers, head_dim 64) with its own trained tokenizer.

Built once per test session in a temp dir; random weights are enough for engine agreement and the
loss maths (forgetting needs the pretrained embedded default, built by `make base-model`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny_models import SAMPLE_TEXTS, build_tiny_llama, build_tokenizer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GPU kernels (Triton) run under Triton's interpreter on machines without CUDA, so their tests run
# everywhere. Set before any kernel module is imported: `triton.jit` reads it at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(out)
    build_tiny_llama(out, vocab_size=len(tok))
    return out


@pytest.fixture(scope="session")
def tiny_jsonl(tmp_path_factory) -> Path:
    """A small text dataset in the user-facing JSONL format."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as fh:
        for i, text in enumerate(SAMPLE_TEXTS[:30]):
            fh.write(json.dumps({"text": f"{i}: {text} {text[: (i * 7) % 40]}"}) + "\n")
    return path


@pytest.fixture(scope="session")
def tool_chat_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with a Qwen2.5-shaped tool-calling chat template (tests/tiny_models.py)."""
    from tiny_models import build_tool_chat_model

    return build_tool_chat_model(tmp_path_factory.mktemp("tiny-tool-chat"))


@pytest.fixture(scope="session")
def tool_chat_jsonl(tmp_path_factory) -> Path:
    """Twelve multi-turn tool-calling conversations in a `messages` column (None-filled keys)."""
    from tiny_models import tool_conversations

    path = tmp_path_factory.mktemp("chat-data") / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in tool_conversations(12)))
    return path
