"""Stage one's settings: the `cache:` section of a config (composed in pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

from stages.common.checks import require
from storage_schemas import DEFAULT_ENCODING, DEFAULT_VALUE_ENCODING, get_encoding

__all__ = ["CacheConfig", "ENGINES", "VLLM_OUTPUTS", "no_draws_message"]

ENGINES = ("vllm", "hf")
VLLM_OUTPUTS = ("pooler", "prompt_logprobs")  # stages/teacher/vllm_engine.py OUTPUTS


def no_draws_message(output: str, asked_by: str) -> str:
    """Why a vLLM output other than the pooler refuses tail draws (`asked_by`: what asks for them), and what to
    set instead: raised when the config loads, and by VLLMEngine itself for callers of the engine API."""
    return (f"cache.vllm_output={output!r} cannot make tail draws ({asked_by}, for sampled_tail): vLLM's "
            "prompt_logprobs returns the top entries only, not the whole distribution the draws "
            f"come from. Use cache.vllm_output=pooler (the default) or cache.engine=hf, or keep this output with an "
            f"encoding without draws (cache.encoding={DEFAULT_VALUE_ENCODING}; then train.method=tail, not sampled_tail).")


@dataclass
class CacheConfig:
    dir: str = field(default="runs/demo/cache", metadata={"help": (
        "where shards and manifest.json go (and config.yaml); a local directory, or a URI pyarrow or fsspec "
        "opens (s3://, gs://, hdfs://, abfs://: docs/scale-out.md)")})
    engine: str = field(default="vllm", metadata={"help": "vllm (default) | hf (transformers forward; oracle, no-vLLM machines)"})
    k: int = field(default=16, metadata={"help": "non-target tokens kept per position (16: the default encoding adds 16 tail draws)"})
    encoding: str = field(default=DEFAULT_ENCODING, metadata={"help": (
        "`storage_schemas.ENCODINGS`. The default, topk_idd_rel4q112_draws16: the topk_idd_rel4q112 codecs plus 16 ids "
        "per position drawn from the teacher's tail and the tail's entropy, for the default train.method=sampled_tail "
        "(docs/design.md; with cache.k=16: 46 bytes per trained position on the demo's code, as good as the live "
        "teacher there; docs/results.md, issue 27). topk_idd_rel4q112_draws{4,8,16,32}: other draw counts. "
        "topk_idd_rel4q112 (no draws: for tail/topk/full_kl only; the previous default): ids "
        "sorted + delta-coded; each log-prob relative to the position's top-1 on a (p/p_1)^(1/4) grid of 112 steps; "
        "the cached share of the non-target mass in its own column (topk_mass), so rounding never moves mass into "
        "or out of the tail; target float16; 47.2 bytes/token at k = 32, mean D_k within 7e-4. Others: "
        "topk_idd_logq7 (the previous default, 63.8 bytes/token, 9e-5), topk_idd_f16, topk_idd_sqrtp10, "
        "topk_f32 (exact, 3.3x the bytes), topk_f16, topk_idd_rel4q28 (a 4x coarser value grid: more k per byte). "
        "Codecs chosen by `make encoding-study` (BENCHMARKS.md). An encoding with draws needs cache.vllm_output=pooler "
        "(the default) or cache.engine=hf")})
    rows_per_shard: int = field(default=256, metadata={"help": "sequences per Parquet shard"})
    zstd_level: int = field(default=9, metadata={"help": "Parquet zstd level (9: ~2 bytes/token below 3 at ~0.5x its write speed)"})
    dtype: str = field(default="float32", metadata={"help": "teacher compute dtype: float32 | bfloat16 | float16"})
    batch_tokens: int = field(default=32768, metadata={"help": "hf engine: tokens per forward; vllm: tokens per generate() call"})
    vllm_output: str = field(default="pooler", metadata={"help": (
        "vllm: pooler (top-k as tensors from vLLM's worker, computed there by a pooling twin of the model; fast) | "
        "prompt_logprobs (stock API, fallback; the same cache, but no tail draws: refused with a draws encoding)")})
    vllm_kv_cache_gib: float = field(default=1.0, metadata={"help": "VLLM_CPU_KVCACHE_SPACE on CPU"})
    gpu_memory_utilization: float = field(default=0.85, metadata={"help": "vLLM on CUDA"})
    tensor_parallel_size: int = field(default=1, metadata={"help": (
        "vLLM: GPUs one teacher is split across (layers' matrices), for a teacher larger than one GPU")})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "vLLM: pipeline stages (layer groups); GPUs per worker = tp * pp"})
    local_dir: str = field(default="", metadata={"help": (
        "remote cache.dir (s3://...): local working copy (stage one writes here, stage two mirrors here); "
        "\"\" = ~/.cache/mtcache/remote/<hash>")})

    def __post_init__(self) -> None:
        require(self.engine in ENGINES, f"cache.engine: {self.engine!r} not in {ENGINES}")
        require(self.k >= 1, f"cache.k: must be >= 1, got {self.k}")
        require(self.vllm_output in VLLM_OUTPUTS, f"cache.vllm_output: {self.vllm_output!r} not in {VLLM_OUTPUTS}")
        try:
            encoding = get_encoding(self.encoding)
        except ValueError as error:
            raise ValueError(f"cache.encoding: {error}") from None
        require(not (encoding.has_draws and self.engine == "vllm" and self.vllm_output != "pooler"),
                no_draws_message(self.vllm_output, f"cache.encoding={self.encoding!r} has them"))
        require(self.rows_per_shard >= 1, f"cache.rows_per_shard: must be >= 1, got {self.rows_per_shard}")
        require(1 <= self.zstd_level <= 22, f"cache.zstd_level: must be in 1..22, got {self.zstd_level}")
        require(self.dtype in ("float32", "bfloat16", "float16"), f"cache.dtype: {self.dtype!r} unsupported")
        require(self.tensor_parallel_size >= 1 and self.pipeline_parallel_size >= 1,
                 "cache.tensor_parallel_size and cache.pipeline_parallel_size must be >= 1")
