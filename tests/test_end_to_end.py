"""The real CLI end to end on the tiny model: vLLM stage one -> verify -> stage two, checking the
exact files each stage writes (what `make demo` does, minus building the default model)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from storage_schemas import Manifest

REPO = Path(__file__).resolve().parents[1]
K = 24  # k+1 = 25 is above vLLM's default max_logprobs (20): the engine must raise it, not fail


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def rows(cache_dir: Path) -> list[dict]:
    return [r for s in Manifest.load(cache_dir).shards for r in pq.read_table(cache_dir / s.file).to_pylist()]


@pytest.mark.vllm
def test_vllm_stage_one_then_training(tiny_model_dir, tiny_jsonl, tmp_path):
    common = ["--config", "", f"model={tiny_model_dir}", f"data.path={tiny_jsonl}", "data.max_length=64",
              f"cache.k={K}", "cache.rows_per_shard=16", "cache.encoding=topk_f32"]  # raw float32 columns compared
    out = cli("cache-teacher", *common, f"cache.dir={tmp_path / 'vllm'}").stdout
    assert "bytes/token" in out and "tok/s" in out
    assert sorted(p.name for p in (tmp_path / "vllm").iterdir()) == [
        "config.yaml", "manifest.json", "shard-00000.parquet", "shard-00001.parquet"]
    assert "OK" in cli("verify", str(tmp_path / "vllm")).stdout

    # The vLLM cache agrees with the transformers oracle: values to float32 noise, ids except at ties.
    cli("cache-teacher", *common, f"cache.dir={tmp_path / 'hf'}", "cache.engine=hf")
    for v, h in zip(rows(tmp_path / "vllm"), rows(tmp_path / "hf")):
        assert v["input_ids"] == h["input_ids"] and v["loss_mask"] == h["loss_mask"]
        np.testing.assert_allclose(v["target_logprob"], h["target_logprob"], atol=2e-5)
        np.testing.assert_allclose(v["topk_logprobs"], h["topk_logprobs"], atol=2e-5)
        vals = np.asarray(h["topk_logprobs"]).reshape(-1, K)
        untied = np.abs(np.diff(vals, axis=1)).min(axis=1) > 1e-5
        ids_v, ids_h = np.asarray(v["topk_ids"]).reshape(-1, K), np.asarray(h["topk_ids"]).reshape(-1, K)
        np.testing.assert_array_equal(ids_v[untied], ids_h[untied])
    assert Manifest.load(tmp_path / "vllm").engine.versions["vllm"]

    run = tmp_path / "run"
    out = cli("train", *common, f"cache.dir={tmp_path / 'vllm'}", f"train.output_dir={run}",
              "train.max_steps=4", "train.save_steps=2", "train.batch_size=4",
              "train.method=tail").stdout  # a float32 cache has no tail draws: the default sampled_tail refuses it
    assert "adapter" in out
    assert {"adapter", "config.yaml", "cache_fingerprint.json", "metrics.json", "log.csv"} <= {p.name for p in run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (run / "adapter").iterdir()}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 4 and np.isfinite(metrics["final_kl"]) and metrics["final_kl"] >= 0


@pytest.mark.vllm
def test_vllm_chat_with_tool_calls_stage_one_train_eval(tool_chat_model_dir, tool_chat_jsonl, tiny_jsonl, tmp_path):
    """Chat data with a multi-turn tool-calling template on the default engine: stage one -> train ->
    eval. Stage one stores, and eval scores, exactly the assistant bodies' tokens, counted here by
    tokenizing each body as written from the rule (tests/tiny_models.py tool_chat_bodies)."""
    from tiny_models import tool_chat_bodies, tool_conversations
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tool_chat_model_dir)
    assistant_positions = sum(len(tok(body, add_special_tokens=False)["input_ids"])
                              for chat in tool_conversations(12) for body in tool_chat_bodies(chat))
    common = ["--config", "", f"model={tool_chat_model_dir}", f"data.path={tool_chat_jsonl}", "data.messages_field=messages",
              "data.max_length=512", "cache.k=8", "cache.rows_per_shard=8", f"cache.dir={tmp_path / 'cache'}"]
    cli("cache-teacher", *common)
    manifest = Manifest.load(tmp_path / "cache")
    assert manifest.complete and manifest.dataset.format == "chat"
    assert sum(s.positions for s in manifest.shards) == assistant_positions

    run = tmp_path / "run"
    cli("train", *common, f"train.output_dir={run}", "train.max_steps=3", "train.batch_size=4")
    out = cli("eval", "--run", str(run), f"eval.target_path={tool_chat_jsonl}", f"eval.source_path={tiny_jsonl}",
              "eval.max_length=512").stdout
    assert "forgetting" in out
    result = json.loads((run / "eval.json").read_text())
    assert result["adapted"]["target"]["tokens"] == result["base"]["target"]["tokens"] == assistant_positions
    assert result["adapted"]["source"]["tokens"] > 0 and np.isfinite(result["adapted"]["source"]["drift_kl"])
