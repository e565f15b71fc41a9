"""The encoding study's settings (`python -m pipeline encoding-study --help` lists them) and constants."""
from __future__ import annotations

from dataclasses import dataclass

from stages.teacher.settings import CacheConfig

__all__ = ["StudyConfig", "K_MAX", "K_CURVE", "DEFAULT_LEVEL"]

K_MAX = 128                                  # teachers are scored once at this k; smaller k = the first k entries
K_CURVE = (8, 16, 32, 64, 128)               # the cost curve's k values
DEFAULT_LEVEL = CacheConfig().zstd_level     # the DEFAULT row, k curve and column split use the default level


@dataclass
class StudyConfig:
    out: str = "runs/encoding-study"               # study.json, study.md, models and caches
    model: str = "build/default/base-model"        # the trained demo base model
    data: str = "build/default/data/target_train.jsonl"
    examples: int = 300                            # demo sequences scored (max 256 tokens each)
    random_sequences: int = 32                     # random32k sequences of `random_length` tokens
    random_length: int = 128
    k: int = 32                                    # k of the candidate table
    lora_std: float = 0.04                         # std of the student's perturbed LoRA B (demo)
    random_lora_std: float = 0.4                   # same for random32k (its weights are small: init 0.02)
    train_cache: str = "runs/demo/cache"           # a k=32 float32 cache for the training comparison
    train_steps: int = 50                          # 0 skips the training comparison
    speed_only: bool = False                       # only time encode+write / read+decode (demo rows)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("examples", "random_sequences", "random_length", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoding-study: --{name.replace('_', '-')} must be >= 1")
        if self.k > K_MAX:
            raise ValueError(f"encoding-study: --k must be <= {K_MAX}")
