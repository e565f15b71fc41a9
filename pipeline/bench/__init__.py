"""`python -m pipeline bench` (or `make bench`): stage one, stage two and the reader, side by side.

    python -m pipeline bench            # full (~10 min on 2 CPU cores) -> runs/bench/<UTC time>.json/.md
    python -m pipeline bench --quick    # tiny shapes, every section (the test runs this)

Every figure is a ratio or a rate measured in this one run, on this machine, on the same model and
inputs as what it is compared with. Sections:
 (a) stage one end to end (engine + top-k + shards, `run_cache_teacher`) vs the same vLLM engine's
     plain prefill vs the hf engine, on the demo model and on a random larger-vocabulary model;
 (b) stage two: CE-only LoRA step vs cached `tail` vs `live`, time and peak memory, same batch;
 (c) cache reader: shards decoded to training tensors vs the training step's consumption;
 (d) how stage one (ratio to prefill, bytes/token) and stage two (tail / CE-only) grow with k,
     sequence length and vocabulary size;
 (e) the demo, 32k and real-vocabulary (151,936-row) models: stage two's CE-only and `tail` steps,
     fused (the default) and unfused, tok/s and peak RSS; eval's peak RSS chunked vs unchunked
     (each memory figure from a fresh process); stage one at 151,936 rows is a row of (a);
 (f) lalora's weight penalty per step, per curvature form (diag, kfac, tri_kfac) vs CE-only, on the
     tiny demo-width Llama and a hidden-1024 one (pipeline/bench/penalty.py, also `bench-penalty`);
 (g) the cached estimators' candidates (issue 27) vs today's `tail` at k = 32: bytes per trained position,
     stage one's tok/s and the fused step, medians of interleaved repetitions (pipeline/bench/estimators.py,
     also `bench-estimators`).
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.bench.estimators import CANDIDATES, measure_estimators
from pipeline.bench.fixtures import build_large_vocab_model, write_long_texts
from pipeline.bench.penalty import measure_penalty
from pipeline.bench.reader import measure_reader
from pipeline.bench.real_vocab import measure_real_vocab
from pipeline.bench.report import render_markdown
from pipeline.bench.settings import FULL, QUICK, BenchSettings
from pipeline.bench.stage_one import measure_stage_one
from pipeline.bench.stage_two import measure_steps, tail_ratio_rows
from stages.teacher.scores import read_model_config

__all__ = ["run_bench"]


def _machine() -> str:
    import torch
    import vllm

    return (f"{os.cpu_count()}-core {platform.machine()} CPU, Python {platform.python_version()}, "
            f"torch {torch.__version__}, vllm {vllm.__version__}")


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def _scaling(demo: dict, large: dict, steps: dict, tails: dict, s: BenchSettings) -> dict:
    """The (d) tables: one row per k, per length, per vocabulary (stage one + stage two columns)."""
    def row(key, value, one, tail):
        return {key: value, "stage_one_over_plain": one["vllm_e2e_over_plain"],
                "bytes_per_token": one["bytes_per_token"], "tail_over_none": tail}

    base_tail = steps["tail"]["step_s"] / steps["none"]["step_s"]

    def tail_at(k: int, length: int) -> float:  # section (b) already measured the main point
        return base_tail if (k, length) == (s.k, s.length) else tails[(k, length)]

    return {
        "k": [row("k", r["k"], r, tail_at(r["k"], s.length)) for r in demo["by_k"]],
        "length": [row("length", r["length"], r, tail_at(s.k, r["length"])) for r in demo["by_length"]],
        "vocab": [row("vocab", demo["vocab_size"], demo["main"], base_tail),
                  row("vocab", large["vocab_size"], large["main"], tails["large"])],
    }


def _measure(s: BenchSettings, tmp: Path) -> dict:
    data = write_long_texts(s.data, tmp / "long.jsonl", count=s.sequences * s.length // min(s.lengths),
                            min_chars=8 * max(s.lengths))
    large_model = str(build_large_vocab_model(tmp / "large-model", s.model, s.large))
    real_model = str(build_large_vocab_model(tmp / "real-model", s.model, s.real))
    demo = {"vocab_size": int(read_model_config(s.model)["vocab_size"]),
            **measure_stage_one(s.model, data, tmp / "demo", s, scaling=True)}
    large = {"vocab_size": s.large.vocab_size, **measure_stage_one(large_model, data, tmp / "large", s, scaling=False)}
    real = {"vocab_size": s.real.vocab_size, **measure_stage_one(real_model, data, tmp / "real", s, scaling=False)}
    steps = measure_steps(s.model, s)
    points = [(k, s.length) for k in s.ks if k != s.k] + [(s.k, n) for n in s.lengths if n != s.length]
    tails = {(r["k"], r["length"]): r["tail_over_none"] for r in tail_ratio_rows(s.model, s, points)}
    tails["large"] = tail_ratio_rows(large_model, s, [(s.k, s.length)])[0]["tail_over_none"]
    reader = measure_reader(tmp / "demo" / "hf", s.model, s, train_tok_s=s.batch * s.length / steps["tail"]["step_s"])
    models = {"demo": s.model, "large": large_model, "real": real_model}
    sizes = {"demo": demo["vocab_size"], "large": s.large.vocab_size, "real": s.real.vocab_size}
    vocab = measure_real_vocab({name: models[name] for name in s.by_vocab}, sizes, s)
    penalty = measure_penalty(s.penalty, s.penalty_steps, s.penalty_warmup)
    estimators = measure_estimators(s.model, s.data, CANDIDATES, s.length, s.estimator_sequences, s.batch, s.estimator_repeats,
                                    engine=s.estimator_engine)
    return {"stage_one": {"demo": demo, "large": large, "real": real}, "stage_two": steps, "reader": reader,
            "scaling": _scaling(demo, large, steps, tails, s), "real_vocab": vocab, "penalty": penalty,
            "estimators": estimators}


def run_bench(quick: bool = False, out_dir: str | Path = "runs/bench", settings: BenchSettings | None = None,
              command: str = "python -m pipeline bench") -> tuple[dict, Path]:
    """Run every section; write `<out_dir>/<UTC time>.json` and `.md`; return (result, json path)."""
    s = settings or (QUICK if quick else FULL)
    stamp, load_before, start = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()), _load(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mtcache-bench-") as tmp:
        result = _measure(s, Path(tmp))
    result["settings"] = asdict(s)
    result["meta"] = {"timestamp": stamp, "quick": quick, "command": command, "machine": _machine(),
                      "load_before": load_before, "load_after": _load(), "wall_s": time.perf_counter() - start}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stamp}.md").write_text(render_markdown(result) + "\n")
    return result, out / f"{stamp}.json"
