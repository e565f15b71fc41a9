"""What every teacher engine returns and checks, shared by the engines and the registry that opens
them (stages/teacher/engine.py): per-sequence scores, the input check and the model's config.

Position i of a sequence of length T predicts token i+1, so each sequence yields T-1 positions.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["PositionScores", "read_model_config", "check_sequences"]


@dataclass
class PositionScores:
    """Teacher scores for one sequence of length T (T-1 positions)."""

    topk_ids: np.ndarray        # [T-1, k] int32, non-target ids, descending teacher probability
    topk_logprobs: np.ndarray   # [T-1, k] float32, full-vocabulary log-softmax (not renormalized)
    target_logprob: np.ndarray  # [T-1] float32, log p(token i+1) at position i
    tail_draw_ids: np.ndarray | None = None  # [T-1, m] int32, ids drawn from the tail (engines opened with draws)
    tail_entropy: np.ndarray | None = None   # [T-1] float32, nats: the within-tail distribution's entropy


def read_model_config(model_dir: str) -> dict:
    """The text-model part of `model_dir/config.json`, with clear errors naming the path."""
    path = os.path.join(str(model_dir), "config.json")
    if not os.path.isdir(str(model_dir)):
        raise FileNotFoundError(f"teacher model directory not found: {model_dir}")
    try:
        with open(path) as fh:
            config = json.load(fh)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read the teacher model config {path}: {err}") from err
    # Multimodal checkpoints nest the language model's config.
    config = config.get("text_config", config)
    if "vocab_size" not in config:
        raise ValueError(f"teacher model config {path} has no vocab_size")
    return config


def check_sequences(sequences: list[np.ndarray], max_length: int, vocab_size: int) -> list[np.ndarray]:
    """The sequences as 1-D int64 arrays; ValueError naming the first bad one."""
    out = []
    for i, seq in enumerate(sequences):
        seq = np.asarray(seq)
        if seq.ndim != 1 or seq.size == 0 or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(f"sequence {i}: expected a non-empty 1-D integer array, got shape "
                             f"{seq.shape} dtype {seq.dtype}")
        if seq.size > max_length:
            raise ValueError(f"sequence {i}: length {seq.size} exceeds max_length={max_length}")
        if seq.min() < 0 or seq.max() >= vocab_size:
            raise ValueError(f"sequence {i}: token ids must lie in [0, {vocab_size}), got "
                             f"[{seq.min()}, {seq.max()}]")
        out.append(seq.astype(np.int64, copy=False))
    return out
