"""What `python -m pipeline bench` measures: one dataclass, a full and a quick preset."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

__all__ = ["BenchSettings", "FULL", "QUICK", "LargeVocabShape", "PenaltyShape", "PENALTY_SHAPES"]


@dataclass(frozen=True)
class LargeVocabShape:
    """The second, random-weight model of stage one's table (the demo model has vocab 2048)."""

    vocab_size: int = 32000
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4     # head_dim 64: vLLM's CPU attention rejects smaller


@dataclass(frozen=True)
class PenaltyShape:
    """One model + batch of the penalty bench (pipeline/bench/penalty.py): a random Llama, head_dim 64."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    vocab_size: int
    rank: int                          # LoRA rank, all-linear
    batch: int
    seq: int


PENALTY_SHAPES = {
    # the tiny random Llama of `bench-step` (pipeline/bench/step.py tiny_llama)
    "demo": PenaltyShape("demo", 128, 256, 2, 392, rank=8, batch=8, seq=256),
    # wide enough that the Kronecker penalty's d^2 r terms show against the step; a step well under 1 s on 2 cores
    "large": PenaltyShape("large", 1024, 2816, 2, 2048, rank=16, batch=2, seq=128),
}


@dataclass(frozen=True)
class BenchSettings:
    model: str = "build/default/base-model"   # the demo model (has the tokenizer the bench data uses)
    data: str = "build/default/data/target_train.jsonl"
    large: LargeVocabShape = field(default_factory=LargeVocabShape)
    # section (e): a real vocabulary (Qwen2.5's 151,936 rows) on a thin model, so the output layer dominates
    real: LargeVocabShape = field(default_factory=lambda: LargeVocabShape(151936, 64, 2, 1))
    by_vocab: tuple[str, ...] = ("demo", "large", "real")  # section (e)'s models
    k: int = 32                        # cached non-target tokens (sections a-c)
    sequences: int = 64                # stage one: sequences per measurement ...
    length: int = 256                  # ... of exactly this many tokens (texts joined, then truncated)
    rows_per_shard: int = 16           # several shards per pass, so the background writer overlaps
    repeats: int = 2                   # stage one: best of this many passes, after one warm-up
    batch: int = 8                     # stage two batch: batch x length tokens
    steps: int = 6                     # stage two: timed steps (median) after `warmup`
    warmup: int = 2
    reader_passes: int = 3             # reader: decode the cache this many times (best pass)
    ks: tuple[int, ...] = (8, 32, 128)             # scaling tables
    lengths: tuple[int, ...] = (64, 256, 512)
    vocab_table: bool = True           # the vocabulary table: demo vs large model (from section a)
    penalty: tuple[PenaltyShape, ...] = tuple(PENALTY_SHAPES.values())  # section (f): lalora's penalty per step
    penalty_steps: int = 5             # section (f): timed rounds after `penalty_warmup`
    penalty_warmup: int = 2
    estimator_repeats: int = 7         # section (g): interleaved repetitions per estimator candidate (medians)
    estimator_sequences: int = 64      # section (g): training rows stage one scores per pass
    estimator_engine: str = "vllm"     # section (g): stage one's engine (QUICK: hf, no second vLLM start in the test)

    def __post_init__(self) -> None:
        if self.k not in self.ks:
            raise ValueError(f"bench: k={self.k} must be one of ks={self.ks} (its row is shared)")
        if self.length not in self.lengths:
            raise ValueError(f"bench: length={self.length} must be one of lengths={self.lengths}")
        if min(self.sequences, self.rows_per_shard, self.repeats, self.batch, self.steps, self.reader_passes,
               self.penalty_steps) < 1:
            raise ValueError("bench: sequences, rows_per_shard, repeats, batch, steps, reader_passes, penalty_steps must be >= 1")


FULL = BenchSettings()
# End to end on small shapes: every section and table, finite numbers, no timing meaning.
QUICK = BenchSettings(large=LargeVocabShape(vocab_size=4096, hidden_size=128, num_hidden_layers=2, num_attention_heads=2),
                      real=LargeVocabShape(vocab_size=8192, hidden_size=64, num_hidden_layers=1, num_attention_heads=1),
                      by_vocab=("real",),
                      sequences=8, length=64, rows_per_shard=4, repeats=1, batch=2, steps=1, warmup=1,
                      reader_passes=1, ks=(8, 32), lengths=(32, 64),
                      penalty=(replace(PENALTY_SHAPES["demo"], batch=2, seq=32),), penalty_steps=2, penalty_warmup=1,
                      estimator_repeats=1, estimator_sequences=8, estimator_engine="hf")
