"""The teacher's compute dtype (`cache.dtype`): a bfloat16 or float16 cache holds the float32 cache's
log-probs within the dtype's precision, on the hf engine and on vLLM (bfloat16 only there: one
engine start).

Tolerance, stated here from the formats, not read from the code: `u` is the dtype's unit roundoff,
2^-8 for bfloat16 (8 significand bits), 2^-11 for float16 (11). The tiny teacher's log-probs reach
-12 nats, and each is a logit minus a log-sum-exp, both the end of a dozen roundings in the dtype (2
layers of norm, attention, MLP and residual adds, then the head), so a log-prob may move by a few u
times ~10. We allow 32 u (bfloat16 0.125 nats, float16 0.016), on the target's log-prob and on each
cached non-target log-prob by rank: the j-th largest is compared with the j-th largest, since the ids
of near-ties may swap and a rank's value moves no more than the largest log-prob error. Measured on
the hf engine: max errors 0.049 (bfloat16, ~12.5 u) and 0.0073 (float16, ~15 u); on vLLM, bfloat16:
0.044 (~11.4 u).
"""
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from stages.teacher.runner import run_cache_teacher
from storage_schemas import Manifest
from storage_schemas.shard_io import verify_cache

UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
TOLERANCE = {name: 32 * u for name, u in UNIT_ROUNDOFF.items()}


def cache_of(model_dir, data_path, cache_dir, engine: str, dtype: str) -> Path:
    run_cache_teacher(load_config(None, [
        f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}", f"cache.engine={engine}",
        f"cache.dtype={dtype}", "cache.k=8", "cache.rows_per_shard=8", "data.max_length=48",
        "cache.encoding=topk_f32", "cache.vllm_kv_cache_gib=0.25"]))  # raw float32 columns: no codec error on top
    return Path(cache_dir)


def read_cache(cache_dir: Path) -> list[dict]:
    return [row for record in Manifest.load(cache_dir).shards for row in pq.read_table(cache_dir / record.file).to_pylist()]


@pytest.fixture(scope="module")
def float32_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory) -> Path:
    return cache_of(tiny_model_dir, tiny_jsonl, tmp_path_factory.mktemp("f32") / "c", "hf", "float32")


def largest_error(cache: Path, reference: Path) -> float:
    """Max |log-prob difference| over every trained position's target and cached ranks; the rows'
    tokens and masks must be the same."""
    rows, ref = read_cache(cache), read_cache(reference)
    assert [r["example_id"] for r in rows] == [r["example_id"] for r in ref] == list(range(30))
    worst = 0.0
    for a, b in zip(rows, ref):
        assert a["input_ids"] == b["input_ids"] and a["loss_mask"] == b["loss_mask"]
        for name in ("target_logprob", "topk_logprobs"):
            worst = max(worst, float(np.abs(np.asarray(a[name]) - np.asarray(b[name])).max()))
    return worst


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_hf_half_precision_cache_is_the_float32_cache_within_the_dtype_precision(dtype, float32_cache, tiny_model_dir,
                                                                                 tiny_jsonl, tmp_path):
    cache = cache_of(tiny_model_dir, tiny_jsonl, tmp_path / dtype, "hf", dtype)
    assert Manifest.load(cache).engine.dtype == dtype and verify_cache(cache) == []
    error = largest_error(cache, float32_cache)
    assert 0 < error <= TOLERANCE[dtype], f"{dtype}: max |d log p| = {error:.4g}, allowed {TOLERANCE[dtype]:.4g}"


@pytest.mark.vllm
def test_vllm_bfloat16_cache_is_the_float32_cache_within_bfloat16_precision(float32_cache, tiny_model_dir, tiny_jsonl, tmp_path):
    cache = cache_of(tiny_model_dir, tiny_jsonl, tmp_path / "vllm-bf16", "vllm", "bfloat16")
    manifest = Manifest.load(cache)
    assert manifest.engine.name == "vllm" and manifest.engine.dtype == "bfloat16" and verify_cache(cache) == []
    error = largest_error(cache, float32_cache)
    assert 0 < error <= TOLERANCE["bfloat16"], f"max |d log p| = {error:.4g}, allowed {TOLERANCE['bfloat16']:.4g}"
