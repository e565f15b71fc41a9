"""Stage one end to end: shards round-trip exactly, verify catches damage, a killed run resumes
to the same cache, and a cache of another model or setting is refused."""
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from file_states import files_state
from tiny_models import build_tiny_llama

from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stages.common.failpoints import ENV_VAR as FAILPOINT_ENV
from stages.teacher.engine import open_engine
from stages.teacher.runner import run_cache_teacher
from storage_schemas import FingerprintMismatch, Manifest
from storage_schemas.shard_io import verify_cache

REPO = Path(__file__).resolve().parents[3]


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
    before = files_state(cache_dir.glob("shard-*"))  # inode, size, mtime, sha256: a rewrite keeping the mtime shows too
    texts = {name: (cache_dir / name).read_bytes() for name in ("manifest.json", "config.yaml")}
    summary = run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, cache_dir))
    assert summary.shards_written_now == 0 and len(before) == 4
    assert files_state(cache_dir.glob("shard-*")) == before
    # the manifest and config.yaml are saved again (atomically) on every run: the same bytes
    assert {name: (cache_dir / name).read_bytes() for name in texts} == texts


def test_truncated_count_is_the_number_of_inputs_longer_than_max_length(tiny_model_dir, tiny_jsonl, tmp_path):
    """Expected counts from the tokenizer alone (one row per text, no EOS appended), not from stage one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tok(json.loads(line)["text"])["input_ids"]) for line in tiny_jsonl.read_text().splitlines()]
    max_length = 22  # the tiny texts are 14..29 tokens: some truncated, most not
    longer = [n > max_length for n in lengths]
    assert 0 < sum(longer) < len(lengths)  # the count can tell "none", "all" and off-by-one apart
    summary = run_cache_teacher(make_config(tiny_model_dir, tiny_jsonl, tmp_path / "c", f"data.max_length={max_length}"))
    manifest = Manifest.load(tmp_path / "c")
    assert summary.truncated == sum(longer)
    assert [s.truncated for s in manifest.shards] == [sum(longer[i:i + 8]) for i in range(0, len(lengths), 8)]
    assert [len(r["input_ids"]) for r in read_cache(tmp_path / "c")] == [min(n, max_length) for n in lengths]


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


# --- kill and resume: a hard kill right after a chosen shard is published (stages/common/failpoints.py) --
def _cli(config_args, failpoint: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, FAILPOINT_ENV: failpoint} if failpoint else {k: v for k, v in os.environ.items() if k != FAILPOINT_ENV}
    return subprocess.run([sys.executable, "-m", "pipeline", "cache-teacher", "--config", "", *config_args],
                          cwd=REPO, capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def kill_run(tiny_model_dir, tmp_path_factory):
    """(config args without cache.dir, uninterrupted reference cache): 60 examples, 6 shards of 10."""
    root = tmp_path_factory.mktemp("kill")
    data = root / "many.jsonl"
    data.write_text("".join(json.dumps({"text": f"line {i}: " + "def f(x): return x * %d " % i * 6}) + "\n" for i in range(60)))
    args = [f"model={tiny_model_dir}", f"data.path={data}", "cache.engine=hf", "cache.k=8",
            "cache.rows_per_shard=10", "cache.batch_tokens=512", "data.max_length=128"]
    run_cache_teacher(load_config(None, [*args, f"cache.dir={root / 'reference'}"]))
    return args, root / "reference"


@pytest.mark.parametrize("last_published", [2, 5])  # mid-run; the last shard, before the manifest says complete
def test_kill_after_a_published_shard_then_resume_gives_the_uninterrupted_cache(kill_run, tmp_path, last_published):
    args, reference = kill_run
    cache = tmp_path / "killed"
    killed = _cli([*args, f"cache.dir={cache}"], failpoint=f"after_shard_published:{last_published}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # the state a kill leaves: shards 0..last published, listed, nothing half-written, not complete
    published = [f"shard-{i:05d}.parquet" for i in range(last_published + 1)]
    assert sorted(p.name for p in cache.iterdir()) == sorted(["config.yaml", "manifest.json", *published])
    partial = Manifest.load(cache)
    assert not partial.complete and [s.file for s in partial.shards] == published
    kept = files_state(cache.glob("shard-*"))
    resumed = _cli([*args, f"cache.dir={cache}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"shards 6 ({5 - last_published} written now)" in resumed.stdout
    assert files_state(cache / name for name in published) == kept  # the published shards were not redone
    # no gap, no duplicate, the values and records of the uninterrupted run
    assert [r["example_id"] for r in read_cache(cache)] == list(range(60))
    assert read_cache(cache) == read_cache(reference)
    done, ref = Manifest.load(cache), Manifest.load(reference)
    assert done.complete and [asdict(r) for r in done.shards] == [asdict(r) for r in ref.shards]
    assert done.token_ids_sha256 == ref.token_ids_sha256 and verify_cache(cache) == []


@pytest.mark.parametrize("shard", [0, 3])  # the first shard (no manifest listed anything yet); a later one
def test_kill_between_a_shards_rename_and_its_manifest_save_resumes(kill_run, tmp_path, shard):
    """The shard file is in place but no manifest lists it: the rerun resumes (rewriting that one file),
    it does not refuse with 'shards but no manifest'."""
    args, reference = kill_run
    cache = tmp_path / "killed"
    killed = _cli([*args, f"cache.dir={cache}"], failpoint=f"after_shard_renamed:{shard}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    on_disk = [f"shard-{i:05d}.parquet" for i in range(shard + 1)]
    assert sorted(p.name for p in cache.iterdir()) == sorted(["config.yaml", "manifest.json", *on_disk])
    assert [s.file for s in Manifest.load(cache).shards] == on_disk[:-1]  # the last file is not listed
    resumed = _cli([*args, f"cache.dir={cache}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"shards 6 ({6 - shard} written now)" in resumed.stdout
    assert [r["example_id"] for r in read_cache(cache)] == list(range(60))
    assert read_cache(cache) == read_cache(reference) and verify_cache(cache) == []


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
