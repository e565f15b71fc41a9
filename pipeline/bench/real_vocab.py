"""Bench section (e): the demo, 32k and a real-vocabulary (151,936-row) model side by side.

Per model: stage two's step (CE-only and `tail`, fused — the default — and `tail` unfused): tokens per
second (rows interleaved in one process) and peak RSS (each row in a fresh process, so the peak is
its own: pipeline.bench.step.compare); eval's peak RSS with the chunked scoring (the default) and
the unchunked one, each in a fresh process. Stage one's vLLM vs hf rate at 151,936 rows is a row of
section (a).
"""
from __future__ import annotations

import multiprocessing as mp
import re
from pathlib import Path

import torch

from pipeline.bench.settings import BenchSettings
from pipeline.bench.step import compare

__all__ = ["STEP_ROWS", "measure_real_vocab", "eval_peak_mib"]

STEP_ROWS = ("none+fused", "tail+fused", "tail")  # CE-only fused, the default tail, the unfused tail


def _rss_peak_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _eval_child(queue, model_dir: str, chunked: bool, batch: int, length: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from stages.eval.evaluate import score_texts

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=8, target_modules="all-linear")).eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    batches = [(ids, torch.ones_like(ids), torch.ones(batch, length - 1, dtype=torch.bool))]
    score_texts(model, batches, with_drift=True, chunked=chunked)
    queue.put(_rss_peak_mib())


def eval_peak_mib(model_dir: str, chunked: bool, batch: int, length: int) -> float:
    """Peak RSS (MiB) of a fresh process that loads the model with a LoRA adapter and scores one
    batch with drift (`stages.eval.evaluate.score_texts`), chunked or not."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_eval_child, args=(queue, model_dir, chunked, batch, length))
    proc.start()
    peak = queue.get()
    proc.join()
    return peak


def measure_real_vocab(models: dict[str, str], vocab_sizes: dict[str, int], s: BenchSettings) -> dict:
    """name -> {vocab_size, steps: {row: {tok_s, peak_mib, ...}}, eval: {chunked_peak_mib, unchunked_peak_mib}}."""
    out = {}
    for name, model in models.items():
        steps = compare(model, batch=s.batch, seq=s.length, k=s.k, steps=s.steps, warmup=s.warmup, estimators=STEP_ROWS)
        for row in steps.values():
            row["tok_s"] = s.batch * s.length / row["step_s"]
        out[name] = {"vocab_size": vocab_sizes[name], "steps": steps,
                     "eval": {f"{mode}_peak_mib": eval_peak_mib(model, mode == "chunked", s.batch, s.length)
                              for mode in ("chunked", "unchunked")}}
    return out
