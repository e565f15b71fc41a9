"""The encoding study's settings (`python -m pipeline encoding-study --help` lists them) and constants."""
from __future__ import annotations

from dataclasses import dataclass, field

from stages.teacher.settings import CacheConfig

__all__ = ["StudyConfig", "K_MAX", "K_CURVE", "DEFAULT_LEVEL"]

K_MAX = 128                                  # teachers are scored once at this k; smaller k = the first k entries
K_CURVE = (8, 16, 32, 64, 128)               # the cost curve's k values
DEFAULT_LEVEL = CacheConfig().zstd_level     # the DEFAULT row, k curve and column split use the default level


@dataclass
class StudyConfig:
    out: str = field(default="runs/encoding-study", metadata={"help": "where study.json, study.md, models and caches go"})
    model: str = field(default="build/default/base-model", metadata={"help": "the teacher: the trained demo base model"})
    data: str = field(default="build/default/data/target_train.jsonl", metadata={"help": "the demo sequences scored"})
    examples: int = field(default=300, metadata={"help": "demo sequences scored (at most 256 tokens each)"})
    random_sequences: int = field(default=32, metadata={"help": "sequences scored by the random 32k-vocabulary model"})
    random_length: int = field(default=128, metadata={"help": "tokens per random-model sequence"})
    k: int = field(default=32, metadata={"help": "cached tokens per position in the candidate table"})
    lora_std: float = field(default=0.04, metadata={"help": (
        "std of the random LoRA B that perturbs the demo student, so D_k is not zero")})
    random_lora_std: float = field(default=0.4, metadata={"help": "the same for the random model (its weights are small: init 0.02)"})
    train_cache: str = field(default="runs/demo/cache", metadata={"help": "a k=32 float32 cache for the training comparison"})
    train_steps: int = field(default=50, metadata={"help": "steps of the training comparison per encoding; 0 skips it"})
    speed_only: bool = field(default=False, metadata={"help": "only time encode+write and read+decode (demo rows)"})
    seed: int = field(default=0, metadata={"help": "seed of the random model, data and LoRA perturbation"})

    def __post_init__(self) -> None:
        for name in ("examples", "random_sequences", "random_length", "k"):
            if getattr(self, name) < 1:
                raise ValueError(f"encoding-study: --{name.replace('_', '-')} must be >= 1")
        if self.k > K_MAX:
            raise ValueError(f"encoding-study: --k must be <= {K_MAX}")
