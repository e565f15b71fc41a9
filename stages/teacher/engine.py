"""The teacher-engine interface of stage one: token ids in, per-position teacher scores out.

    from stages.teacher.engine import open_engine
    engine = open_engine("vllm", "path/to/model", k=32)     # or "hf" (transformers forward)
    try:
        scores = engine.score([np.array([1, 17, 42, 9])])    # one PositionScores per sequence
    finally:
        engine.close()

Position i of a sequence of length T predicts token i+1, so each sequence yields T-1 positions
(docs/design.md §7). Per position an engine returns the k non-target tokens with the largest teacher
probability, their full-vocabulary log-probs, and the target's own log-prob (docs/design.md §3).
Engines are imported lazily so that the hf engine works on machines without vLLM.
"""
from __future__ import annotations

import importlib
from typing import Protocol

import numpy as np

from stages.teacher.scores import PositionScores, read_model_config

__all__ = ["TeacherEngine", "ENGINES", "DTYPES", "open_engine"]

# name -> "module:class"; the class is constructed as cls(model_dir, k, dtype, max_length, batch_tokens,
# vocab_size=..., **engine_kwargs).
ENGINES = {
    "vllm": "stages.teacher.vllm_engine:VLLMEngine",
    "hf": "stages.teacher.hf_engine:HFEngine",
}
DTYPES = ("float32", "bfloat16", "float16")


class TeacherEngine(Protocol):
    name: str
    vocab_size: int  # rows of the output layer (may exceed the tokenizer's length)

    # keys: one integer per sequence (the example id), the tail draws' key; required when opened with draws
    def score(self, sequences: list[np.ndarray], keys: list[int] | None = None) -> list[PositionScores]: ...

    def close(self) -> None: ...


def open_engine(
    name: str,
    model_dir: str,
    k: int,
    dtype: str = "float32",
    max_length: int = 512,
    batch_tokens: int = 32768,
    draws: int = 0,
    draw_seed: int = 0,
    **engine_kwargs,
) -> TeacherEngine:
    """Validate the request, then start engine `name` on the model in `model_dir`.

    Raises ValueError (naming the problem) for an unknown engine or dtype, a k outside
    1..vocab_size-1 (k = vocab_size-1 is the exact mode: every non-target token), or a max_length
    beyond the model's positions; FileNotFoundError / ValueError naming the path for a missing or
    unreadable model directory. `draws` > 0: each position also gets that many ids drawn from the
    teacher's tail with seed `draw_seed` (stages/teacher/tail_draws.py; `score` then needs `keys`).
    """
    if name not in ENGINES:
        raise ValueError(f"unknown teacher engine {name!r}; known engines: {', '.join(ENGINES)}")
    if dtype not in DTYPES:
        raise ValueError(f"unsupported teacher dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    if max_length < 2 or batch_tokens < max_length:
        raise ValueError(f"need 2 <= max_length <= batch_tokens, got max_length={max_length}, "
                         f"batch_tokens={batch_tokens}")
    config = read_model_config(model_dir)
    vocab_size = int(config["vocab_size"])
    # One of the k+1 entries an engine asks for may be the target, so k+1 <= vocab_size.
    if not 1 <= k <= vocab_size - 1:
        raise ValueError(f"k={k} is out of range for a teacher with vocab_size={vocab_size}: "
                         f"need 1 <= k <= vocab_size - 1 = {vocab_size - 1} (k = vocab_size - 1 keeps "
                         f"every non-target token)")
    max_positions = config.get("max_position_embeddings")
    if max_positions is not None and max_length > int(max_positions):
        raise ValueError(f"max_length={max_length} exceeds the model's max_position_embeddings="
                         f"{max_positions} ({model_dir})")
    module_name, class_name = ENGINES[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if draws < 0:
        raise ValueError(f"draws: must be >= 0, got {draws}")
    if draws:
        engine_kwargs.update(draws=draws, draw_seed=draw_seed)
    return cls(str(model_dir), k, dtype, max_length, batch_tokens, vocab_size=vocab_size, **engine_kwargs)
