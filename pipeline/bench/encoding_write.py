"""Stage one end to end per cache encoding, side by side on one engine: what writing costs.

    python -m pipeline bench-encoding-write [--examples 64] [--length 256] [--rounds 3]

One vLLM pooler engine (and the stock engine for the plain prefill baseline) serves every variant;
the variants run in turn, `--rounds` times, best tok/s kept. The engine's own scoring is the same
for all of them, so the differences are the encode + zstd + Parquet + sha256 work of each encoding
(run on stage one's background writer thread).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.bench.stage_one import _config, _plain_prefill, _sequences
from stages.teacher.engine import open_engine
from stages.teacher.runner import run_cache_teacher

VARIANTS = (("topk_f32", 3), ("topk_idd_logq7", 3), ("topk_idd_rel4q112", 6), ("topk_idd_rel4q112", 9))


def measure(model: str, data: str, examples: int, length: int, rounds: int, k: int = 32) -> list[dict]:
    with tempfile.TemporaryDirectory() as work:
        base = _config(model, Path(data), Path(work) / "c", "vllm", k, length, examples, 256)
        sequences = _sequences(base)
        tokens = sum(len(s) for s in sequences)
        stock = open_engine("vllm", model, k=k, max_length=length, output="prompt_logprobs")
        pooler = open_engine("vllm", model, k=k, max_length=length, output="pooler")
        try:
            best: dict[str, dict] = {}
            for _ in range(rounds):
                plain = tokens / _plain_prefill(stock, sequences)
                best["plain prefill"] = {"tok_s": max(plain, best.get("plain prefill", {}).get("tok_s", 0.0))}
                for encoding, level in VARIANTS:
                    config = _config(model, Path(data), Path(work) / f"{encoding}-{level}", "vllm", k, length, examples,
                                     256, extra=(f"cache.encoding={encoding}", f"cache.zstd_level={level}"))
                    summary = run_cache_teacher(config, overwrite=True, engine=pooler)
                    name = f"{encoding}, zstd {level}"
                    if summary.tokens_per_second > best.get(name, {}).get("tok_s", 0.0):
                        best[name] = {"tok_s": summary.tokens_per_second, "bytes_per_token": summary.bytes_per_token}
        finally:
            stock.close()
            pooler.close()
    plain = best.pop("plain prefill")["tok_s"]
    return [{"variant": "plain prefill", "tok_s": plain, "over_plain": 1.0}] + [
        {"variant": name, **row, "over_plain": row["tok_s"] / plain} for name, row in best.items()]


def bench_encoding_write(model: str, data: str, examples: int = 64, length: int = 256, rounds: int = 3) -> list[dict]:
    """`python -m pipeline bench-encoding-write`: `measure`, printed as JSON and a markdown table."""
    rows = measure(model, data, examples, length, rounds)
    print(json.dumps(rows, indent=1))
    print("| variant | stage one tok/s | / plain prefill | bytes/token |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['tok_s']:,.0f} | {r['over_plain']:.2f} | {r.get('bytes_per_token', 0):.1f} |")
    return rows
