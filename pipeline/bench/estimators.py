"""Bench section (g): the cached estimators' candidates against today's `tail`, side by side (issue 27).

    python -m pipeline bench-estimators                  # demo model, 7 interleaved repetitions
    python -m pipeline bench-estimators --repeats 5 --sequences 32

Each candidate is a (method, cache k, encoding) triple. Measured in one process, round-robin with the order
rotated each round (so load drifting on a shared machine, and a slot's position, hit every candidate alike),
medians of `repeats` repetitions:
- stage one: `run_cache_teacher` end to end with ONE vLLM pooler engine whose k and draws are set per
  candidate before each pass (both are per-request pooling parameters), tok/s and bytes per trained
  position (all shard bytes / trained positions);
- stage two: one fused LoRA step (forward, CE + the estimator, backward, AdamW) on the same synthetic
  batch, whose teacher columns (top-k and tail draws) come from the base model's own log-softmax.
Ratios are to the first candidate, today's `tail` at k = 32 in the default encoding.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.bench.interleave import rotated
from pipeline.bench.report import estimators_section
from pipeline.bench.stage_one import _config, _sequences
from pipeline.bench.step import synthetic_batch
from stages.student.adapters import make_student
from stages.student.loss_mixin import batch_loss
from stages.student.methods import get_method
from stages.student.settings import LoraSettings
from stages.teacher.engine import open_engine
from stages.teacher.runner import run_cache_teacher
from storage_schemas import DEFAULT_ENCODING, DEFAULT_VALUE_ENCODING, get_encoding

__all__ = ["Candidate", "CANDIDATES", "measure_estimators", "bench_estimators"]


@dataclass(frozen=True)
class Candidate:
    name: str
    method: str
    k: int
    encoding: str

    @property
    def draws(self) -> int:
        return get_encoding(self.encoding).tail_draws


CANDIDATES = (
    Candidate("tail k=32", "tail", 32, DEFAULT_VALUE_ENCODING),
    Candidate("sampled_tail k=16 m=16", "sampled_tail", 16, DEFAULT_ENCODING),
    Candidate("tail k=40 rel4q28", "tail", 40, "topk_idd_rel4q28"),
)


def _stage_one(model: str, data: str, work: Path, candidates, length: int, sequences: int, repeats: int,
               engine_name: str = "vllm") -> dict:
    configs = {c.name: _config(model, Path(data), work / str(i), engine_name, c.k, length, sequences, 16,
                               extra=(f"cache.encoding={c.encoding}",)) for i, c in enumerate(candidates)}
    tokens = sum(len(x) for x in _sequences(configs[candidates[0].name]))
    pooler = {"output": "pooler"} if engine_name == "vllm" else {}
    engine = open_engine(engine_name, model, k=max(c.k for c in candidates), max_length=length, **pooler)
    rates: dict[str, list[float]] = {c.name: [] for c in candidates}
    sizes: dict[str, float] = {}
    try:
        for round_ in range(repeats + 1):  # round 0 warms up
            for c in rotated(candidates, round_):
                engine.k, engine.draws, engine.draw_seed = c.k, c.draws, get_encoding(c.encoding).draw_seed
                summary = run_cache_teacher(configs[c.name], overwrite=True, engine=engine)
                sizes[c.name] = summary.bytes / max(summary.positions, 1)
                if round_:
                    rates[c.name].append(summary.tokens_per_second)
    finally:
        engine.close()
    return {c.name: {"tok_s": statistics.median(rates[c.name]), "bytes_per_position": sizes[c.name], "tokens": tokens}
            for c in candidates}


def _stage_two(model_dir: str, candidates, batch: int, seq: int, repeats: int, warmup: int = 2) -> dict:
    torch.manual_seed(0)
    model = make_student(model_dir, LoraSettings(rank=8), torch.float32)
    inputs = {c.name: synthetic_batch(model, batch, seq, c.k, draws=c.draws) for c in candidates}
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for round_ in range(warmup + repeats):
        for c in rotated(candidates, round_):
            start = time.perf_counter()
            batch_loss(model, inputs[c.name], get_method(c.method), reg_weight=1.0, fused=True).loss.backward()
            optim.step()
            optim.zero_grad(set_to_none=True)
            if round_ >= warmup:
                times[c.name].append(time.perf_counter() - start)
    return {c.name: {"step_s": statistics.median(times[c.name])} for c in candidates}


def measure_estimators(model: str, data: str, candidates=CANDIDATES, length: int = 256, sequences: int = 64,
                       batch: int = 8, repeats: int = 7, engine: str = "vllm") -> list[dict]:
    """One row per candidate: stage-one tok/s and bytes per trained position, the fused step's seconds, and
    their ratios to the first candidate (medians of `repeats` interleaved repetitions). `engine`: stage one's
    ("vllm": its pooler, the default path; "hf": the transformers engine, both make the draws)."""
    with tempfile.TemporaryDirectory(prefix="mtcache-estimators-") as tmp:
        one = _stage_one(model, data, Path(tmp), candidates, length, sequences, repeats, engine)
    two = _stage_two(model, candidates, batch, length, repeats)
    base = candidates[0].name
    return [{"candidate": c.name, "method": c.method, "k": c.k, "draws": c.draws, "encoding": c.encoding,
             **one[c.name], **two[c.name], "repeats": repeats,
             "stage_one_ratio": one[c.name]["tok_s"] / one[base]["tok_s"],
             "step_ratio": two[c.name]["step_s"] / two[base]["step_s"]} for c in candidates]


def render_estimators(rows: list[dict]) -> str:
    """The markdown table of `measure_estimators` rows (the bench report's section (g))."""
    return "\n".join(estimators_section({"estimators": rows})) + "\n"


def bench_estimators(model: str = "build/default/base-model", data: str = "build/default/data/target_train.jsonl",
                     repeats: int = 7, sequences: int = 64, length: int = 256, batch: int = 8) -> list[dict]:
    """`python -m pipeline bench-estimators`: prints the table and the JSON."""
    rows = measure_estimators(model, data, CANDIDATES, length, sequences, batch, repeats)
    print(render_estimators(rows))
    print(json.dumps(rows))
    return rows
