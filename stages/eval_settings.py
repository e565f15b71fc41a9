"""Eval's settings: the `eval:` section of a config (composed in pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from stages.checks import require

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    source_path: str = "build/default/data/source_heldout.jsonl"  # retention set: what must not be forgotten
    target_path: str = "build/default/data/target_heldout.jsonl"  # held-out data of the new task
    # Each set is read as stage one reads data: a set whose rows hold data.messages_field (or
    # "messages") is chat, scored on the assistant bodies; otherwise data.text_field, every token.
    text_field: str = ""                 # DEPRECATED: use data.text_field (still honoured, with a warning)
    max_length: int = 256                # sequences are truncated to this many tokens
    max_examples: int = 300              # per set; 0 = all
    batch_size: int = 8
    # true: log-probs, accuracy and drift from the last hidden state, the head applied in row chunks
    # within 256 MiB (stages/evaluate.py), so memory does not grow with batch x length x vocabulary;
    # false: from full [B, T, V] logits (the reference path, kept to measure against).
    chunked: bool = True

    def __post_init__(self) -> None:
        if self.text_field:
            import warnings

            warnings.warn("eval.text_field is deprecated: eval reads each set with data.text_field / "
                          "data.messages_field, like stage one; remove eval.text_field from the config",
                          FutureWarning, stacklevel=2)
        require(self.max_length >= 2, f"eval.max_length: must be >= 2, got {self.max_length}")
        require(self.max_examples >= 0 and self.batch_size >= 1, "eval.max_examples >= 0 and eval.batch_size >= 1")
