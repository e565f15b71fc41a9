"""Stage one end to end: shards round-trip exactly, verify catches damage, a killed run resumes
to the same cache, and a cache of another model or setting is refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from tiny_models import build_tiny_llama

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stages.cache_teacher import run_cache_teacher
from stages.teacher.engine import open_engine
from storage_schemas import FingerprintMismatch, Manifest
from storage_schemas.shard_io import verify_cache

REPO = Path(__file__).resolve().parents[2]


def make_config(model_dir, data_path, cache_dir, *extra):
    return load_config(None, [f"model={model_dir}", f"data.path={data_path}", f"cache.dir={cache_dir}",
                              "cache.engine=hf", "cache.k=8", "cache.rows_per_shard=8", "data.max_length=48",
                              "cache.encoding=topk_f32", *extra])  # exact values: raw columns compare exactly


def read_cache(cache_dir) -> list[dict]:
    manifest = Manifest.load(cache_dir)
    rows = []
    for record in manifest.shards:
        rows.extend(pq.read_table(Path(cache_dir) / record.file).to_pylist())
    return rows


@pytest.fixture(scope="module")
def hf_cache(tiny_model_dir, tiny_jsonl, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("cache") / "c"
    summary = run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, cache_dir))
    return cache_dir, summary


def test_shards_round_trip_the_engine_output_exactly(hf_cache, tiny_model_dir):
    cache_dir, summary = hf_cache
    rows = read_cache(cache_dir)
    assert [r["example_id"] for r in rows] == list(range(30)) and summary.examples == 30 and summary.shards == 4
    engine = open_engine("hf", str(tiny_model_dir), k=8, max_length=48)
    scores = engine.score([np.asarray(r["input_ids"], np.int32) for r in rows])
    for row, score in zip(rows, scores):
        mask = np.asarray(row["loss_mask"])
        assert mask.all() and len(mask) == len(row["input_ids"]) - 1
        np.testing.assert_array_equal(np.asarray(row["topk_ids"]).reshape(-1, 8), score.topk_ids[mask])
        np.testing.assert_array_equal(np.asarray(row["topk_logprobs"], np.float32).reshape(-1, 8), score.topk_logprobs[mask])
        np.testing.assert_array_equal(np.asarray(row["target_logprob"], np.float32), score.target_logprob[mask])


def test_manifest_fingerprints_and_counts(hf_cache, tiny_model_dir):
    cache_dir, summary = hf_cache
    manifest = Manifest.load(cache_dir)
    assert manifest.complete and manifest.num_rows == 30 and manifest.settings.k == 8
    assert manifest.tokenizer.vocab_size == json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert manifest.engine.name == "hf" and "torch" in manifest.engine.versions
    assert [s.file for s in manifest.shards] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert summary.truncated == sum(s.truncated for s in manifest.shards) and summary.bytes_per_token > 0
    assert (cache_dir / "config.yaml").exists() and verify_cache(cache_dir) == []


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_a_damaged_shard(hf_cache, tmp_path, damage, capsys):
    cache_dir = tmp_path / "copy"
    shutil.copytree(hf_cache[0], cache_dir)
    shard = cache_dir / "shard-00002.parquet"
    if damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-100])
    else:
        shard.unlink()
    problems = verify_cache(cache_dir)
    assert len(problems) == 1 and problems[0].startswith("shard-00002.parquet")
    assert cli_main(["verify", str(cache_dir)]) == 1
    assert "shard-00002.parquet" in capsys.readouterr().err


def test_rerun_of_a_complete_cache_writes_nothing(hf_cache, tiny_model_dir, tiny_jsonl):
    cache_dir, _ = hf_cache
    before = {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*")}
    summary = run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, cache_dir))
    assert summary.shards_written_now == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in cache_dir.glob("shard-*")}


def test_cache_of_other_settings_or_model_is_refused(hf_cache, tiny_model_dir, tiny_jsonl, tmp_path):
    cache_dir, _ = hf_cache
    with pytest.raises(FingerprintMismatch, match=r"settings\.k"):
        run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, cache_dir, "cache.k=4"))
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    build_tiny_llama(other, vocab_size=Manifest.load(cache_dir).tokenizer.vocab_size, seed=1)
    with pytest.raises(FingerprintMismatch, match=r"teacher\.weights_sha256"):
        run_cache_teacher(make_config(other, tiny_jsonl, cache_dir))
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    summary = run_cache_teacher(make_config(other, tiny_jsonl, copy), overwrite=True)
    assert summary.shards_written_now == 4 and verify_cache(copy) == []


def test_k_at_least_vocab_and_bad_model_path_are_refused(tiny_model_dir, tiny_jsonl, tmp_path):
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    with pytest.raises(ValueError, match=f"cache.k={vocab}"):
        run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, tmp_path / "c", f"cache.k={vocab}"))
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        run_cache_teacher(make_config(tmp_path / "no-such-model", tiny_jsonl, tmp_path / "c"))


def test_bad_example_fails_before_anything_is_written(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "fine text"}) + "\n" + json.dumps({"text": "  "}) + "\n")
    with pytest.raises(ValueError, match="example 1"):
        run_cache_teacher(make_config(tiny_model_dir, data, tmp_path / "c"))
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_inspect_decodes_a_position(hf_cache, capsys):
    assert cli_main(["inspect", str(hf_cache[0]), "--example", "3", "--position", "2", "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "target" in out and out.count("\n") >= 8 and "R_T" in out


# --- kill and resume ------------------------------------------------------------------------
def _cli(config_args, **kw):
    return subprocess.Popen([sys.executable, "-m", "pipeline", "cache-teacher", "--config", "", *config_args],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_cache(tiny_model_dir, tmp_path):
    data = tmp_path / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: " + "def f(x): return x * %d " % i * 6}) + "\n" for i in range(400)))
    args = [f"model={tiny_model_dir}", f"data.path={data}", "cache.engine=hf", "cache.k=8",
            "cache.rows_per_shard=20", "cache.batch_tokens=512", "data.max_length=128"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert _cli([*args, f"cache.dir={reference}"]).wait() == 0
    proc = _cli([*args, f"cache.dir={killed}"])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (killed / "manifest.json").exists() and len(Manifest.load(killed).shards) >= 2:
            os.kill(proc.pid, signal.SIGKILL)  # mid-shard: the third shard is being scored
            break
        time.sleep(0.02)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    partial = Manifest.load(killed)
    assert not partial.complete and 2 <= len(partial.shards) < 20
    assert _cli([*args, f"cache.dir={killed}"]).wait() == 0
    done, ref = Manifest.load(killed), Manifest.load(reference)
    assert done.complete and done.token_ids_sha256 == ref.token_ids_sha256
    assert [r["example_id"] for r in read_cache(killed)] == list(range(400))
    assert read_cache(killed) == read_cache(reference)
    assert verify_cache(killed) == []


# --- vLLM: the top-k pooler and the stock prompt log-probs write the same cache ---------------
@pytest.mark.vllm
def test_vllm_pooler_and_prompt_logprobs_write_the_same_cache(tiny_model_dir, tiny_jsonl, tmp_path):
    caches = {}
    for output in ("pooler", "prompt_logprobs"):
        caches[output] = tmp_path / output
        run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, caches[output], "cache.engine=vllm",
                                      f"cache.vllm_output={output}", "cache.vllm_kv_cache_gib=0.25"))
    pooled, stock = read_cache(caches["pooler"]), read_cache(caches["prompt_logprobs"])
    assert len(pooled) == len(stock) == 30
    for a, b in zip(pooled, stock):
        for name in ("example_id", "input_ids", "loss_mask", "topk_ids"):
            assert a[name] == b[name], f"example {a['example_id']}: {name}"
        for name in ("topk_logprobs", "target_logprob"):
            np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-5, err_msg=f"example {a['example_id']}: {name}")
    assert verify_cache(caches["pooler"]) == [] and Manifest.load(caches["pooler"]).engine.name == "vllm"
