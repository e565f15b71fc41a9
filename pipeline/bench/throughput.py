"""Stage-one throughput: vLLM plain prefill vs the vLLM engine's score() (pooler and stock
prompt_logprobs outputs) vs the hf engine's score().

    python -m pipeline bench-teacher                      # two random Llamas, built in a temp dir
    python -m pipeline bench-teacher --model-dir PATH --json out.json

Scores `--sequences` random sequences of `--length` tokens with k non-target entries per position and
reports tokens per second (best of `--repeats`, after one warm-up) and score / plain-prefill, the
stage-one cost figure of BENCHMARKS.md. Plain prefill runs on the same vLLM engine (max_tokens=1, no
prompt log-probs). The vLLM engine is closed before the hf engine runs so they never share cores.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench.models import build_random_llama
from stages.teacher.engine import open_engine

__all__ = ["MODEL_SHAPES", "random_sequences", "measure", "bench_teacher"]

# name -> LlamaConfig overrides; "tiny" is the test fixture's shape (its tokenizer has 392 tokens).
MODEL_SHAPES = {
    "tiny": dict(vocab_size=392, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    "mid": dict(vocab_size=8192, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4),
}


def random_sequences(n: int, length: int, vocab_size: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=length) for _ in range(n)]


def _best_tok_per_s(fn, n_tokens: int, repeats: int) -> float:
    """Tokens per second of the fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n_tokens / best


def measure(model_dir: str, num_sequences: int = 64, length: int = 256, k: int = 32, repeats: int = 3) -> dict:
    """{"vllm_prefill", "vllm_score" (pooler output), "vllm_score_prompt_logprobs", "hf_score"} in tok/s,
    and "score_over_prefill" (pooler). The pooler output needs a tokenizer in model_dir (vLLM's pooling
    runner loads one); without it "vllm_score" is measured with prompt_logprobs."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    vocab_size = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
    sequences = random_sequences(num_sequences, length, vocab_size)
    n_tokens = num_sequences * length
    # The random models have no tokenizer; vLLM then logs a harmless "Chat template warmup failed".
    engine = open_engine("vllm", model_dir, k=k, max_length=length, batch_tokens=n_tokens,
                         skip_tokenizer_init=True, output="prompt_logprobs")
    try:
        prompts = [TokensPrompt(prompt_token_ids=s.tolist()) for s in sequences]
        # Repeated prompts would hit vLLM's prefix cache and skip most of the prefill (~2x faster
        # than a real prefill here); prompt_logprobs requests never read that cache.
        plain = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_reading_prefix_cache=True)
        result = {"vllm_prefill": _best_tok_per_s(lambda: engine.llm.generate(prompts, plain, use_tqdm=False),
                                                  n_tokens, repeats),
                  "vllm_score_prompt_logprobs": _best_tok_per_s(lambda: engine.score(sequences), n_tokens, repeats)}
    finally:
        engine.close()
    result["vllm_score"] = result["vllm_score_prompt_logprobs"]
    if (Path(model_dir) / "tokenizer.json").exists():  # the pooling runner loads one (ENVIRONMENT.md)
        engine = open_engine("vllm", model_dir, k=k, max_length=length, batch_tokens=n_tokens, output="pooler")
        try:
            result["vllm_score"] = _best_tok_per_s(lambda: engine.score(sequences), n_tokens, repeats)
        finally:
            engine.close()
    engine = open_engine("hf", model_dir, k=k, max_length=length, batch_tokens=n_tokens)
    try:
        result["hf_score"] = _best_tok_per_s(lambda: engine.score(sequences), n_tokens, repeats)
    finally:
        engine.close()
    result["score_over_prefill"] = result["vllm_score"] / result["vllm_prefill"]
    return result


def bench_teacher(model_dir: str | None = None, sequences: int = 64, length: int = 256, k: int = 32, repeats: int = 3,
                  json_path: str | None = None) -> dict:
    """`python -m pipeline bench-teacher`: `measure` on `model_dir` (default: the MODEL_SHAPES random Llamas,
    built in a temporary directory); prints the table, writes `json_path` if given."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="mtcache-measure-") as tmp:
        models = {model_dir: model_dir} if model_dir else {
            name: str(build_random_llama(Path(tmp) / name, max_position_embeddings=2048, **shape))
            for name, shape in MODEL_SHAPES.items()}
        for name, path in models.items():
            results[name] = measure(path, sequences, length, k, repeats)
    print(f"{sequences} x {length} tokens, k={k}, best of {repeats} (tok/s)")
    print(f"{'model':>8} {'vllm prefill':>13} {'vllm score':>11} {'hf score':>9} {'score/prefill':>14}")
    for name, r in results.items():
        print(f"{name:>8} {r['vllm_prefill']:>13.0f} {r['vllm_score']:>11.0f} {r['hf_score']:>9.0f} "
              f"{r['score_over_prefill']:>14.2f}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results
