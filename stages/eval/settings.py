"""Eval's settings: the `eval:` section of a config (composed in pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from stages.common.checks import require

__all__ = ["EvalConfig"]


@dataclass
class EvalConfig:
    source_path: str = field(default="build/default/data/source_heldout.jsonl", metadata={"help": (
        "retention set: what must not be forgotten (forgetting). Each set is read as stage one reads data, in the "
        "format its own columns hold (data.format's auto rule): text scores every token, chat the assistant bodies, "
        "prompt-completion the completion. A Hub dataset id works too")})
    target_path: str = field(default="build/default/data/target_heldout.jsonl", metadata={"help": (
        "held-out data of the new task (learning); read as source_path is. The defaults of both are the embedded "
        "demo's sets: for any other model eval refuses until both are set")})
    split: str = field(default="", metadata={"help": (
        "the split of each eval set that is a dataset folder with several splits (save_to_disk DatasetDict); "
        "\"\" = its only split (a folder with several is refused, naming them); data files have one split")})
    target_split: str = field(default="", metadata={"help": "the target set's split, when its folder needs another than eval.split"})
    source_split: str = field(default="", metadata={"help": "the source set's split, when its folder needs another than eval.split"})
    max_length: int = field(default=256, metadata={"help": "sequences are truncated to this many tokens"})
    max_examples: int = field(default=300, metadata={"help": "per set; 0 = all"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    chunked: bool = field(default=True, metadata={"help": (
        "true: log-probs, accuracy and drift from the last hidden state, the head applied in row chunks within "
        "256 MiB (stages/eval/evaluate.py), so memory does not grow with batch x length x vocabulary; false: from full "
        "[B, T, V] logits (the reference path, kept to measure against)")})

    def __post_init__(self) -> None:
        require(self.max_length >= 2, f"eval.max_length: must be >= 2, got {self.max_length}")
        require(self.max_examples >= 0 and self.batch_size >= 1, "eval.max_examples >= 0 and eval.batch_size >= 1")
