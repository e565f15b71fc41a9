"""Real teacher caches for stage-two tests, built from a transformers forward of the tiny model.

`make_cache` is an independent, minimal stage one: full-vocabulary log-softmax, the k largest
non-target log-probs per trained position, shards written with `storage_schemas.shard_io`, and a
complete manifest fingerprinting the tiny model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.data.inputs import INPUT_RULES
from storage_schemas import CacheSettings, DatasetFingerprint, EngineInfo, Manifest
from storage_schemas.fingerprints import teacher_fingerprint, tokenizer_fingerprint
from storage_schemas.shard_io import ShardRow, rows_to_table, write_shard

MAX_TOKENS = 40


def tokenize_jsonl(model_dir: Path, jsonl: Path, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [json.loads(line)["text"] for line in jsonl.read_text().splitlines()]
    return [tok(t)["input_ids"][:max_tokens] for t in texts]


def prompt_length(index: int) -> int:
    """Untrained leading positions of example `index` (0, 2 or 5): exercises -100 prompt labels."""
    return (0, 2, 5)[index % 3]


@torch.no_grad()
def teacher_rows(model_dir: Path, token_ids: list[list[int]], k: int) -> list[ShardRow]:
    """One ShardRow per sequence, teacher values from a float32 transformers forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    rows = []
    for i, ids in enumerate(token_ids):
        x = torch.tensor(ids)[None]
        logp = torch.log_softmax(model(x).logits[0, :-1].double(), -1).float()  # [T-1, V]
        mask = np.arange(len(ids) - 1) >= prompt_length(i)
        targets = x[0, 1:][torch.from_numpy(mask)]
        a = logp[torch.from_numpy(mask)]
        vals, top = a.scatter(-1, targets[:, None], float("-inf")).topk(k, -1)
        rows.append(ShardRow(i, np.asarray(ids, np.int32), mask, a.gather(-1, targets[:, None])[:, 0].numpy(),
                             top.numpy().astype(np.int32), vals.numpy()))
    return rows


def make_cache(model_dir: Path, token_ids: list[list[int]], out_dir: Path, k: int, rows_per_shard: int = 8,
               encoding: str = "topk_f32", source: str = "tiny.jsonl") -> Manifest:
    """Write a complete cache of `token_ids` into `out_dir`; returns its manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = teacher_rows(model_dir, token_ids, k)
    records = []
    for index, start in enumerate(range(0, len(rows), rows_per_shard)):
        table = rows_to_table(rows[start:start + rows_per_shard], encoding, k)
        records.append(write_shard(out_dir, index, start, table, zstd_level=3, truncated=0))
    manifest = Manifest(
        teacher=teacher_fingerprint(model_dir), tokenizer=tokenizer_fingerprint(model_dir),
        dataset=DatasetFingerprint(source, "train", "text", "text", "0" * 64, len(rows), input_rules=INPUT_RULES["text"]),
        settings=CacheSettings(k, encoding, MAX_TOKENS, "right", rows_per_shard, 3),
        engine=EngineInfo("hf", "float32", {"torch": torch.__version__}),
        shards=records, complete=True,
        token_ids_sha256=hashlib.sha256("".join(r.token_ids_sha256 for r in records).encode()).hexdigest(),
    )
    manifest.save(out_dir)
    return manifest


def dir_snapshot(path: Path) -> dict[str, str]:
    """{relative file name: sha256} of every file under `path` (byte-identity checks)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session", autouse=True)
def hf_datasets_cache(tmp_path_factory):
    """Keep `datasets`' Arrow conversions in a temp dir, for this process and its subprocesses."""
    import datasets

    path = tmp_path_factory.mktemp("hf-datasets")
    old_env, old = os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_DATASETS_CACHE"], datasets.config.HF_DATASETS_CACHE = str(path), path
    yield path
    datasets.config.HF_DATASETS_CACHE = old
    if old_env is None:
        os.environ.pop("HF_DATASETS_CACHE", None)
    else:
        os.environ["HF_DATASETS_CACHE"] = old_env


@pytest.fixture(scope="session")
def snapshot():
    return dir_snapshot


@pytest.fixture(scope="session")
def build_cache():
    return make_cache


@pytest.fixture(scope="session")
def tiny_token_ids(tiny_model_dir, tiny_jsonl) -> list[list[int]]:
    return tokenize_jsonl(tiny_model_dir, tiny_jsonl)


@pytest.fixture(scope="session")
def tiny_cache(tiny_model_dir, tiny_token_ids, tmp_path_factory) -> Path:
    """30 sequences, k = 8, 4 shards. Read-only: copy it (`cache_copy`) before damaging it."""
    out = tmp_path_factory.mktemp("cache-k8")
    make_cache(tiny_model_dir, tiny_token_ids, out, k=8)
    return out


@pytest.fixture(scope="session")
def full_vocab_cache(tiny_model_dir, tiny_token_ids, tmp_path_factory) -> Path:
    """8 sequences with k = V - 1: every non-target token is cached (the exactness case)."""
    out = tmp_path_factory.mktemp("cache-full")
    vocab = tokenizer_fingerprint(tiny_model_dir).vocab_size
    make_cache(tiny_model_dir, tiny_token_ids[:8], out, k=vocab - 1, rows_per_shard=4)
    return out


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(tiny_cache, out)
    return out
