"""Bench section (a) and the stage-one columns of (d): the real stage one vs the engine's prefill.

For one model, on the same fixed-length sequences, measured round-robin (so load drifting on a shared
machine hits every variant alike), best of `repeats`:
- `plain`: vLLM plain prefill (max_tokens=1, no prompt log-probs, prefix cache not read);
- `vllm_e2e`: `run_cache_teacher` with the vLLM engine's default `pooler` output (top-k computed in
  vLLM's worker, background shard writer): teacher pass incl. top-k, Parquet/zstd writing, manifest;
- `vllm_score`: the same engine's `score()` alone (no shards), to show what writing costs;
- `stock_e2e`: `run_cache_teacher` with the stock `prompt_logprobs` output (the fallback);
- `hf_e2e`: `run_cache_teacher` with the transformers engine.
Engine start and tokenization are excluded (StageOneSummary.tokens_per_second).
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.bench.settings import BenchSettings
from pipeline.config import load_config
from stages.data.inputs import load_rows, tokenize_rows
from stages.teacher.engine import open_engine
from stages.teacher.runner import run_cache_teacher
from storage_schemas import DEFAULT_VALUE_ENCODING

__all__ = ["measure_stage_one"]


def _config(model: str, data: Path, cache_dir: Path, engine: str, k: int, length: int, examples: int,
            rows_per_shard: int, vllm_output: str = "pooler", extra: tuple[str, ...] = ()):
    """A stage-one config for the bench; `extra` = further `key=value` overrides (e.g. the encoding).

    The encoding is the default's codecs without tail draws (DEFAULT_VALUE_ENCODING) unless `extra` says
    otherwise: every engine and output can write it (prompt_logprobs cannot make draws), so sections (a) and
    (d) compare the engines on the same work; section (g) measures what the draws add."""
    return load_config(None, [
        f"model={model}", f"data.path={data}", f"data.max_length={length}", f"data.max_examples={examples}",
        f"cache.dir={cache_dir}", f"cache.engine={engine}", f"cache.vllm_output={vllm_output}", f"cache.k={k}",
        f"cache.rows_per_shard={rows_per_shard}", "cache.batch_tokens=32768", f"cache.encoding={DEFAULT_VALUE_ENCODING}", *extra,
    ])


def _sequences(config) -> list:
    """The token ids stage one scores for `config` (the same tokenization as run_cache_teacher)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    return [e.input_ids for e in tokenize_rows(load_rows(config.data), tokenizer, config.data)]


def _plain_prefill(engine, sequences) -> float:
    """Seconds for one plain prefill of `sequences` on a generate-runner vLLM engine."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in s]) for s in sequences]
    start = time.perf_counter()
    engine.llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def _round(engines: dict, configs: dict, sequences: list, tokens: int, full: bool) -> dict[str, tuple[float, float]]:
    """One timed pass of each variant: name -> (tok/s, bytes per token or 0)."""
    out = {"plain": (tokens / _plain_prefill(engines["stock"], sequences), 0.0)}
    for name, (engine_key, config) in configs.items():
        summary = run_cache_teacher(config, overwrite=True, engine=engines[engine_key])
        out[name] = (summary.tokens_per_second, summary.bytes_per_token)
    if full:
        start = time.perf_counter()
        engines["pooler"].score(sequences)
        out["vllm_score"] = (tokens / (time.perf_counter() - start), 0.0)
    return out


def _measure_point(engines, model, data, work, s: BenchSettings, k: int, length: int, full: bool) -> dict:
    """Best-of-`repeats` tok/s of each variant at (k, length), and the ratios to plain prefill."""
    examples = s.sequences * s.length // length  # the same token budget at every length
    configs = {"vllm_e2e": ("pooler", _config(model, data, work / "vllm", "vllm", k, length, examples, s.rows_per_shard))}
    if full:
        configs["stock_e2e"] = ("stock", _config(model, data, work / "stock", "vllm", k, length, examples,
                                                 s.rows_per_shard, "prompt_logprobs"))
        configs["hf_e2e"] = ("hf", _config(model, data, work / "hf", "hf", k, length, examples, s.rows_per_shard))
    sequences = _sequences(configs["vllm_e2e"][1])
    tokens = sum(len(x) for x in sequences)
    # The pooler and hf engines read k at each call; the stock engine is only used at s.k.
    engines["pooler"].k = engines["hf"].k = k
    best: dict[str, tuple[float, float]] = {}
    for _ in range(s.repeats):
        for name, value in _round(engines, configs, sequences, tokens, full).items():
            best[name] = max(best.get(name, value), value)
    row = {"k": k, "length": length, "sequences": len(sequences), "tokens": tokens,
           "bytes_per_token": best["vllm_e2e"][1], **{f"{n}_tok_s": v[0] for n, v in best.items()}}
    row.update({f"{n}_over_plain": v[0] / best["plain"][0] for n, v in best.items() if n != "plain"})
    return row


def _open_engines(model: str, s: BenchSettings) -> dict:
    max_length = max(s.lengths)
    engines = {}
    try:
        # The stock engine's max_logprobs is fixed at start, so it serves only s.k (section a); it
        # also runs the plain prefill, which does not depend on k.
        engines["stock"] = open_engine("vllm", model, k=s.k, max_length=max_length, output="prompt_logprobs")
        engines["pooler"] = open_engine("vllm", model, k=s.k, max_length=max_length, output="pooler")
        engines["hf"] = open_engine("hf", model, k=s.k, max_length=max_length)
    except BaseException:
        _close(engines)
        raise
    return engines


def _close(engines: dict) -> None:
    for engine in engines.values():
        engine.close()


def measure_stage_one(model: str, data: Path, work: Path, s: BenchSettings, scaling: bool) -> dict:
    """{"main": row at (s.k, s.length) with every variant, "by_k": [...], "by_length": [...]};
    the scaling rows (only when `scaling`) measure plain prefill and the vLLM end to end."""
    engines = _open_engines(model, s)
    try:
        result = {"main": _measure_point(engines, model, data, work, s, s.k, s.length, full=True)}
        if scaling:
            result["by_k"] = [result["main"] if k == s.k else _measure_point(engines, model, data, work, s, k, s.length, False)
                              for k in s.ks]
            result["by_length"] = [result["main"] if n == s.length else
                                   _measure_point(engines, model, data, work, s, s.k, n, False) for n in s.lengths]
    finally:
        _close(engines)
    return result
