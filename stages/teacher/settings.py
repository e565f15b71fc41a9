"""Stage one's settings: the `cache:` section of a config (composed in pipeline/config.py)."""
from __future__ import annotations

from dataclasses import dataclass

from stages.checks import require
from storage_schemas import DEFAULT_ENCODING, get_encoding

__all__ = ["CacheConfig", "ENGINES", "VLLM_OUTPUTS"]

ENGINES = ("vllm", "hf")
VLLM_OUTPUTS = ("pooler", "prompt_logprobs")  # stages/teacher/vllm_engine.py OUTPUTS


@dataclass
class CacheConfig:
    dir: str = "runs/demo/cache"         # where shards and manifest.json go
    engine: str = "vllm"                 # vllm (default) | hf (transformers forward; oracle, no-vLLM machines)
    k: int = 32                          # non-target tokens kept per position
    encoding: str = DEFAULT_ENCODING     # storage_schemas.ENCODINGS (topk_idd_rel4q112); topk_f32 = exact (3.3x the bytes)
    rows_per_shard: int = 256            # sequences per Parquet shard
    zstd_level: int = 9                  # Parquet zstd level (9: ~2 bytes/token below 3 at ~0.5x its write speed)
    dtype: str = "float32"               # teacher compute dtype: float32 | bfloat16 | float16
    batch_tokens: int = 32768            # hf engine: tokens per forward; vllm: tokens per generate() call
    vllm_output: str = "pooler"          # vllm: pooler (top-k as tensors from vLLM's worker) | prompt_logprobs (stock API, fallback)
    vllm_kv_cache_gib: float = 1.0       # VLLM_CPU_KVCACHE_SPACE on CPU
    gpu_memory_utilization: float = 0.85 # vLLM on CUDA
    tensor_parallel_size: int = 1        # vLLM: GPUs one teacher is split across (layers' matrices)
    pipeline_parallel_size: int = 1      # vLLM: pipeline stages (layer groups); GPUs per worker = tp * pp
    local_dir: str = ""                  # remote cache.dir (s3://...): local working copy; "" = ~/.cache/mtcache/remote/<hash>

    def __post_init__(self) -> None:
        require(self.engine in ENGINES, f"cache.engine: {self.engine!r} not in {ENGINES}")
        require(self.k >= 1, f"cache.k: must be >= 1, got {self.k}")
        require(self.vllm_output in VLLM_OUTPUTS, f"cache.vllm_output: {self.vllm_output!r} not in {VLLM_OUTPUTS}")
        get_encoding(self.encoding)
        require(self.rows_per_shard >= 1, f"cache.rows_per_shard: must be >= 1, got {self.rows_per_shard}")
        require(1 <= self.zstd_level <= 22, f"cache.zstd_level: must be in 1..22, got {self.zstd_level}")
        require(self.dtype in ("float32", "bfloat16", "float16"), f"cache.dtype: {self.dtype!r} unsupported")
        require(self.tensor_parallel_size >= 1 and self.pipeline_parallel_size >= 1,
                 "cache.tensor_parallel_size and cache.pipeline_parallel_size must be >= 1")
